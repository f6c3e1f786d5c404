"""A site's (hospital's) configuration: one TOML file, owned by the site, never sent anywhere.

The SuperNode is started with ``--node-config 'site-config="/path/site.toml"'``; the site's
ClientApp reads the file for every message. Relative paths are resolved against the
directory of the TOML file::

    site_id = "hospital-a"                      # opaque id shown to the coordinator
    data = "data/visits.csv"                    # the site's table (never leaves the site)
    schema = "schema.toml"                      # the federation's agreed schema
    ledger = "out/ledger.json"                  # this site's privacy ledger (must exist:
                                                # fediim ledger init --site-config site.toml)
    output_dir = "out"                          # imputed.csv, flags.csv, audit.jsonl, bank.npz
    # bank = "out/bank.npz"                     # optional: the signed bank fediim impute
    # bank_signature = "out/bank.sig.json"      #   --site-config reads (default: output_dir)
    # max_bank_age_days = 365                   # optional: older banks are refused
    coordinator_public_key = "coordinator.pub"  # pinned Ed25519 key that must sign the bank
    site_key = "site.key"                       # optional: signs the handshake (identity)

    [budget]                                    # this site's total privacy budget
    epsilon = 3.0
    delta = 1e-6                                # every request must be at this delta
    max_epsilon_per_run = 1.0                   # optional: no one run may ask for more

    # reply_time_quantum = 2.0                  # replies leave at multiples of this (s)
    # insecure_seeded_noise = true              # simulations only; never in a deployment

    [serve]                                     # optional: `fediim serve` (all keys optional)
    token_file = "serve.token"                  # bearer token (file readable by its owner
                                                #   only); or token_env = "FEDIIM_TOKEN"
    # host = "127.0.0.1"                        # a non-loopback host needs a token
    # port = 8787
    # mode = "hybrid"                           # how the bank is used (see fediim impute)
    # max_rows = 10000                          # per request (413 above)
    # max_body_bytes = 8388608                  # per request (413 above)
    # monitor_fraction = 0.1                    # share of complete rows with one cell
                                                #   masked, imputed and scored
    # drift_mean_shift = 0.5                    # drift: |mean - site's mean| / site's sd
    # drift_error_ratio = 2.0                   # drift: monitored RMSE / validated RMSE

The coordinator's public key is pinned here, out of band: the site never learns it from the
coordinator itself (no trust on first use), and refuses any bank not signed with it. The
site converts every request at its own ``delta`` (a request at another delta is refused, so
a coordinator cannot make a spend look cheaper), and refuses a request above
``max_epsilon_per_run`` (absent: one run may spend the whole remaining budget).
``insecure_seeded_noise`` lets a simulation ask for seeded noise, which whoever knows the
seed can subtract; the ledger marks every such release. The former key
``allow_seeded_noise`` is refused, so that no old file turns it on unnoticed.
``fediim impute --site-config`` imputes new rows every day from the signed bank of the last
run (``bank``/``bank_signature``, by default ``bank.npz``/``bank.sig.json`` in
``output_dir``), without spending budget; it refuses a bank older than
``max_bank_age_days`` (:mod:`fediim.protocol.signed_bank`).
``fediim serve --site-config`` serves the same imputation over HTTP (:mod:`fediim.serve`);
its optional ``[serve]`` table is :class:`ServeSettings`.
``site_key`` (Ed25519 or ECDSA, PEM or OpenSSH; the SuperNode's node-authentication key will
do) signs the site's handshake, so that a coordinator with a site registry knows that the
node claiming this site id holds the key registered for it (:mod:`fediim.protocol.identity`),
and the site's secure-aggregation keys. ``site_registry`` (every site's registered public
key, the coordinator's registry copied out of band) lets the site verify the other sites'
secure-aggregation keys, so that the coordinator cannot substitute them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from fediim.errors import SiteConfigError
from fediim.federated.plan import Mode
from fediim.io.toml import read_toml, toml_document
from fediim.io.validation import FiniteFloat, format_validation_error
from fediim.privacy import epsilon_to_rho

__all__ = ["Budget", "ServeSettings", "SiteConfig", "SiteConfigError", "load_site_config",
           "site_config_toml"]

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Budget(BaseModel):
    """The site's total (epsilon, delta) budget, kept as rho-zCDP in its ledger, and the most
    epsilon (at the same delta) that one run may ask for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: FiniteFloat = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    max_epsilon_per_run: FiniteFloat | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _cap_within_budget(self) -> Budget:
        if self.max_epsilon_per_run is not None and self.max_epsilon_per_run > self.epsilon:
            raise ValueError("max_epsilon_per_run must not exceed the total epsilon")
        return self

    @property
    def rho(self) -> float:
        """The budget in rho-zCDP (what the ledger is opened with)."""
        return _rho(self.epsilon, self.delta)


@lru_cache(maxsize=64)
def _rho(epsilon: float, delta: float) -> float:
    # epsilon_to_rho bisects over OpenDP's conversion (~0.1-0.3 s): compute each once.
    return epsilon_to_rho(epsilon, delta)


class ServeSettings(BaseModel):
    """The site's imputation service (``fediim serve``): where it listens, who may call it,
    how much one request may carry, and how it watches its own quality.

    ``token_file`` (or the environment variable ``token_env``) holds the bearer token
    every caller must present; without one the service listens on a loopback address
    only. Monitoring: ``monitor_fraction`` of the incoming complete rows get one random
    cell masked, imputed and scored (a rolling window of ``monitor_window`` cells per
    column; a binary or categorical column is scored by its level error rate instead).
    Drift: over the last ``drift_window`` rows, a column whose observed mean (a
    categorical column: any level's frequency) moved more than ``drift_mean_shift``
    standard deviations from the site's own (the bank's where the site does not measure
    the column; the bank's noised moments are too rough a yardstick) after
    ``drift_min_rows`` values, or whose monitored RMSE exceeds ``drift_error_ratio`` times
    its cross-validated RMSE (after ``drift_min_cells`` cells).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8787, ge=0, le=65535)
    token_file: Path | None = None
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    mode: Mode = "hybrid"
    n_neighbors: int = Field(default=10, ge=1)
    max_rows: int = Field(default=10_000, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    monitor_fraction: FiniteFloat = Field(default=0.1, ge=0, le=1)
    monitor_window: int = Field(default=500, ge=10)
    drift_window: int = Field(default=500, ge=10)
    drift_min_rows: int = Field(default=50, ge=1)
    drift_mean_shift: FiniteFloat = Field(default=0.5, gt=0)
    drift_min_cells: int = Field(default=30, ge=1)
    drift_error_ratio: FiniteFloat = Field(default=2.0, gt=1)
    #: Plans made at start-up: every (observed features, target) key when there are at
    #: most this many, else those with one missing cell and those of the site's own rows.
    #: A key not made at start-up is made at its first request (about a second on ccpp),
    #: holding up the requests behind it.
    warm_keys: int = Field(default=256, ge=0)

    @model_validator(mode="after")
    def _one_token_source(self) -> ServeSettings:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("give token_file or token_env, not both")
        return self


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
    insecure_seeded_noise: StrictBool = False
    #: Seconds: every reply leaves at a whole multiple of this after its request arrived,
    #: so the coordinator cannot time the work (it grows with the records); 0 disables.
    reply_time_quantum: FiniteFloat = Field(default=2.0, ge=0, le=600)
    site_key: Path | None = None  # signs the handshake (fediim.protocol.identity)
    #: Every site's registered public identity key (a site registry TOML, as the
    #: coordinator's): a secure run's key advertisements are verified against it.
    site_registry: Path | None = None
    bank: Path | None = None  # the signed bank to impute from; default output_dir/bank.npz
    bank_signature: Path | None = None  # its signature; default output_dir/bank.sig.json
    #: Days: ``fediim impute --site-config`` refuses an older bank (join a new run).
    max_bank_age_days: FiniteFloat = Field(default=365.0, gt=0)
    serve: ServeSettings = ServeSettings()

    @property
    def bank_path(self) -> Path:
        """Where the site's signed bank is read from."""
        return self.bank if self.bank is not None else self.output_dir / "bank.npz"

    @property
    def bank_signature_path(self) -> Path:
        """Where the signature of :attr:`bank_path` is read from."""
        if self.bank_signature is not None:
            return self.bank_signature
        return self.output_dir / "bank.sig.json"


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate a site TOML (SiteConfigError naming the file on any problem)."""
    source = os.fspath(path)
    raw = read_toml(path, SiteConfigError, "site configuration file")
    if isinstance(raw, dict) and "allow_seeded_noise" in raw:
        raise SiteConfigError(
            f"{source}: allow_seeded_noise: the key is now insecure_seeded_noise (seeded noise "
            "can be removed by whoever knows the seed: simulations only, never a deployment); "
            "rename it to turn seeded noise on deliberately")
    base = Path(source).resolve().parent
    for key in ("data", "schema", "ledger", "output_dir", "coordinator_public_key", "site_key",
                "site_registry", "bank", "bank_signature"):
        if isinstance(raw.get(key), str):
            raw[key] = base / Path(raw[key]).expanduser()
    serve = raw.get("serve")
    if isinstance(serve, dict) and isinstance(serve.get("token_file"), str):
        raw["serve"] = {**serve, "token_file": base / Path(serve["token_file"]).expanduser()}
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
        "insecure_seeded_noise": config.insecure_seeded_noise,
        "reply_time_quantum": config.reply_time_quantum,
        "site_key": str(config.site_key) if config.site_key is not None else None,
        "site_registry": (str(config.site_registry)
                          if config.site_registry is not None else None),
        "bank": str(config.bank) if config.bank is not None else None,
        "bank_signature": (str(config.bank_signature)
                           if config.bank_signature is not None else None),
        "max_bank_age_days": config.max_bank_age_days,
    }
    budget = {"epsilon": config.budget.epsilon, "delta": config.budget.delta,
              "max_epsilon_per_run": config.budget.max_epsilon_per_run}
    serve = {name: str(value) if isinstance(value, Path) else value
             for name, value in config.serve.model_dump(exclude_defaults=True).items()}
    tables = {"": top, "budget": budget, **({"serve": serve} if serve else {})}
    return toml_document(tables,
                         header="fediim site configuration: stays at the site")
