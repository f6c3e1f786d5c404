"""A site's (hospital's) configuration: one TOML file, owned by the site, never sent anywhere.

The SuperNode is started with ``--node-config 'site-config="/path/site.toml"'``; the site's
ClientApp reads the file for every message. Relative paths are resolved against the
directory of the TOML file::

    site_id = "hospital-a"                      # opaque id shown to the coordinator
    data = "data/visits.csv"                    # the site's table (never leaves the site)
    schema = "schema.toml"                      # the federation's agreed schema
    ledger = "out/ledger.json"                  # this site's privacy ledger (created if absent)
    output_dir = "out"                          # imputed.csv, flags.csv, audit.jsonl, bank.npz
    coordinator_public_key = "coordinator.pub"  # pinned Ed25519 key that must sign the bank
    site_key = "site.key"                       # optional: signs the handshake (identity)

    [budget]                                    # this site's total privacy budget
    epsilon = 3.0
    delta = 1e-6

    # allow_seeded_noise = true                 # simulations only; never in a deployment

The coordinator's public key is pinned here, out of band: the site never learns it from the
coordinator itself (no trust on first use), and refuses any bank not signed with it.
``site_key`` (Ed25519 or ECDSA, PEM or OpenSSH; the SuperNode's node-authentication key will
do) signs the site's handshake, so that a coordinator with a site registry knows that the
node claiming this site id holds the key registered for it (:mod:`fediim.protocol.identity`).
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from fediim.errors import SiteConfigError
from fediim.io.toml import toml_document
from fediim.io.validation import FiniteFloat, format_validation_error
from fediim.privacy import epsilon_to_rho

__all__ = ["Budget", "SiteConfig", "SiteConfigError", "load_site_config", "site_config_toml"]

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Budget(BaseModel):
    """The site's total (epsilon, delta) budget, kept as rho-zCDP in its ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: FiniteFloat = Field(gt=0)
    delta: float = Field(gt=0, lt=1)

    @property
    def rho(self) -> float:
        """The budget in rho-zCDP (what the ledger is opened with)."""
        return _rho(self.epsilon, self.delta)


@lru_cache(maxsize=64)
def _rho(epsilon: float, delta: float) -> float:
    # epsilon_to_rho bisects over OpenDP's conversion (~0.1-0.3 s): compute each once.
    return epsilon_to_rho(epsilon, delta)


class SiteConfig(BaseModel):
    """A validated site configuration (paths absolute)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    site_id: str = Field(pattern=SITE_ID_PATTERN)
    data: Path
    schema_path: Path = Field(alias="schema")
    ledger: Path
    output_dir: Path
    coordinator_public_key: Path
    budget: Budget
    allow_seeded_noise: StrictBool = False
    site_key: Path | None = None  # signs the handshake (fediim.protocol.identity)


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate a site TOML (SiteConfigError naming the file on any problem)."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise SiteConfigError(f"{source}: site configuration file not found") from None
    except OSError as exc:
        raise SiteConfigError(f"{source}: cannot read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteConfigError(f"{source}: invalid TOML ({exc})") from None
    base = Path(source).resolve().parent
    for key in ("data", "schema", "ledger", "output_dir", "coordinator_public_key", "site_key"):
        if isinstance(raw.get(key), str):
            raw[key] = base / Path(raw[key]).expanduser()
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as exc:
        # No offending values: a site relays this message to the coordinator in its refusal.
        raise SiteConfigError(format_validation_error(
            exc, source, multiline=False, show_input=False,
            allowed_keys=[f.alias or n for n, f in SiteConfig.model_fields.items()],
        )) from None


def site_config_toml(config: SiteConfig) -> str:
    """TOML text that :func:`load_site_config` reads back to ``config``."""
    top = {
        "site_id": config.site_id,
        "data": str(config.data),
        "schema": str(config.schema_path),
        "ledger": str(config.ledger),
        "output_dir": str(config.output_dir),
        "coordinator_public_key": str(config.coordinator_public_key),
        "allow_seeded_noise": config.allow_seeded_noise,
        "site_key": str(config.site_key) if config.site_key is not None else None,
    }
    budget = {"epsilon": config.budget.epsilon, "delta": config.budget.delta}
    return toml_document({"": top, "budget": budget},
                         header="fediim site configuration: stays at the site")
