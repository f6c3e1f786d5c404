"""The files of a local federation: coordinator keys, per-site TOMLs, the Flower app."""


from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fediim.errors import DeployError, LedgerError
from fediim.io.atomic import atomic_write_text
from fediim.io.toml import toml_string, toml_value
from fediim.protocol.run_config import RUN_CONFIG_DEFAULTS
from fediim.protocol.site_config import SITE_ID_PATTERN

__all__ = ["APP_DIR_NAME", "FederationLayout", "SiteLayout", "app_pyproject", "prepare_federation"]

APP_DIR_NAME = "fediim-app"
#: The site registry's file name in the coordinator's directory.
REGISTRY_NAME = "site-registry.toml"


@dataclass(frozen=True)
class SiteLayout:
    """One site's files under ``DIR/<site_id>``."""

    site_id: str
    data: Path
    directory: Path
    config: Path
    ledger: Path


@dataclass(frozen=True)
class FederationLayout:
    """What :func:`prepare_federation` wrote."""

    out: Path
    schema: Path
    coordinator_dir: Path
    signing_key: Path
    public_key: Path
    sites: tuple[SiteLayout, ...]
    run_config: dict[str, Any] = field(default_factory=dict)
    site_registry: Path | None = None  # site id -> public key (fediim.protocol.identity)


def _site_ids(data: Sequence[Path]) -> list[str]:
    """Site ids from the data files' names: safe characters only, unique."""
    ids: list[str] = []
    for path in data:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._") or "site"
        if not re.match(SITE_ID_PATTERN, base):
            base = ("site-" + base)[:64]
        site_id, suffix = base, 2
        while site_id in ids:
            site_id, suffix = f"{base}-{suffix}", suffix + 1
        ids.append(site_id)
    return ids


def _check_existing_ledger(path: Path, site_id: str, rho_budget: float) -> None:
    """Refuse an existing ledger at ``path`` that is corrupt or belongs to another site or
    budget (a re-run into the same directory must keep each site's budget)."""
    from fediim.privacy import PrivacyLedger

    if not path.exists():
        return
    try:
        PrivacyLedger.open(path, rho_budget, site_id)
    except LedgerError as exc:
        raise LedgerError(f"{exc} (run with the budget the ledger was created with, or "
                          "into a new --out)") from exc


def _site_key(site_dir: Path) -> Path:
    """The site's identity key ``site.key`` (0600) beside ``site.pub``, written once and
    reused: it signs the site's handshakes (:mod:`fediim.protocol.identity`)."""
    from fediim.protocol.identity import load_site_private_key
    from fediim.protocol.signing import write_keypair

    key, public_key = site_dir / "site.key", site_dir / "site.pub"
    if key.exists() and public_key.exists():
        load_site_private_key(key)
    else:
        write_keypair(key, public_key)
    return key


def _write_site_registry(registry: Path, sites: Sequence[SiteLayout]) -> None:
    """The site registry: every site's id -> its ``site.pub`` (the coordinator's, which the
    sites also read to verify each other's secure-aggregation keys)."""
    from fediim.protocol.identity import site_registry_toml

    atomic_write_text(registry, site_registry_toml(
        {site.site_id: site.directory / "site.pub" for site in sites}))


def prepare_federation(
    data: Sequence[str | os.PathLike[str]],
    schema: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epsilon: float = RUN_CONFIG_DEFAULTS["epsilon"],
    delta: float = RUN_CONFIG_DEFAULTS["delta"],
    budget_epsilon: float | None = None,
    min_sites: int | None = None,
    site_ids: Sequence[str] | None = None,
    insecure_seeded_noise: bool = False,
    run_config: dict[str, Any] | None = None,
) -> FederationLayout:
    """Write the coordinator key and one site TOML per data file under ``out``.

    Each site's budget is ``budget_epsilon`` (default: this run's ``epsilon``) at ``delta``;
    each site gets an identity key (``site.key``), registered in the coordinator's site
    registry (``coordinator/site-registry.toml``, run config ``site-registry``); its
    ledger is created here (``PrivacyLedger.create``: sites never create one). An
    existing signing key in ``out/coordinator`` is reused, and existing ledgers are kept, so
    spend accumulates across runs into the same ``out``; an existing ledger of another site
    or budget raises :class:`LedgerError` before anything is written. A new ``out`` is
    made readable by its owner only (it will hold every site's records); an existing
    one keeps its mode.
    """
    from fediim.io.schema import load_schema
    from fediim.protocol.site_config import Budget

    out_dir = Path(out).resolve()
    schema_path = Path(schema).resolve()
    load_schema(schema_path).bounds_array()  # fail early, naming the file
    files = [Path(path).resolve() for path in data]
    if not files:
        raise DeployError("at least one --data file is needed")
    ids = list(site_ids) if site_ids is not None else _site_ids(files)
    if len(ids) != len(files) or len(set(ids)) != len(ids):
        raise DeployError(f"need one unique site id per data file, got {ids}")
    budget = Budget(epsilon=budget_epsilon if budget_epsilon is not None else epsilon,
                    delta=delta)
    for site_id in ids:
        _check_existing_ledger(out_dir / site_id / "ledger.json", site_id, budget.rho)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one: the owner only
    coordinator_dir = out_dir / "coordinator"
    key, public_key = _coordinator_keys(coordinator_dir)
    registry = coordinator_dir / REGISTRY_NAME
    sites = [_prepare_site(out_dir / site_id, site_id, data_file, schema_path, public_key,
                           budget, insecure_seeded_noise, registry)
             for site_id, data_file in zip(ids, files, strict=True)]
    _write_site_registry(registry, sites)
    run = {
        "schema": str(schema_path), "signing-key": str(key), "out-dir": str(coordinator_dir),
        "site-registry": str(registry),
        "min-sites": int(min_sites if min_sites is not None else len(files)),
        "expected-sites": len(files), "epsilon": float(epsilon), "delta": float(delta),
        **(run_config or {}),
    }
    return FederationLayout(out_dir, schema_path, coordinator_dir, key, public_key,
                            tuple(sites), run, site_registry=registry)


def _coordinator_keys(coordinator_dir: Path) -> tuple[Path, Path]:
    """The coordinator's signing key pair, written once and reused by later runs."""
    from fediim.protocol.signing import load_private_key, write_keypair

    coordinator_dir.mkdir(parents=True, exist_ok=True)
    key, public_key = coordinator_dir / "signing.key", coordinator_dir / "coordinator.pub"
    if key.exists() and public_key.exists():
        load_private_key(key)
    else:
        write_keypair(key, public_key)
    return key, public_key


def _prepare_site(site_dir: Path, site_id: str, data_file: Path, schema_path: Path,
                  public_key: Path, budget: Any, insecure_seeded_noise: bool,
                  registry: Path) -> SiteLayout:
    """One site's directory: its ledger (created once), identity key and site TOML."""
    from fediim.privacy import PrivacyLedger
    from fediim.protocol.site_config import SiteConfig, site_config_toml

    site_dir.mkdir(parents=True, exist_ok=True)
    ledger = site_dir / "ledger.json"
    if not ledger.exists():
        PrivacyLedger.create(ledger, budget.rho, site_id)
    config = SiteConfig(site_id=site_id, data=data_file, schema=schema_path, ledger=ledger,
                        output_dir=site_dir, coordinator_public_key=public_key, budget=budget,
                        insecure_seeded_noise=insecure_seeded_noise,
                        site_key=_site_key(site_dir), site_registry=registry)
    atomic_write_text(site_dir / "site.toml", site_config_toml(config))
    return SiteLayout(site_id, data_file, site_dir, site_dir / "site.toml", ledger)


def app_pyproject(run_config: dict[str, Any]) -> str:
    """A minimal Flower app: the installed ``coordinator``/``site_client`` apps + config
    (every key of :class:`~fediim.protocol.run_config.RunConfig`, ``run_config`` over its
    defaults)."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise DeployError(f"unknown run-config keys {unknown}")
    merged = {**RUN_CONFIG_DEFAULTS, **run_config}
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{APP_DIR_NAME}"',
        'version = "0.1.0"',
        'description = "fediim local deployment (apps come from the installed fediim)"',
        'license = "Apache-2.0"',
        'dependencies = ["flwr>=1.41,<1.43"]',
        "",
        "[tool.flwr.app]",
        'publisher = "fediim"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "coordinator.app:app"',
        'clientapp = "site_client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{toml_string(k)} = {toml_value(v)}" for k, v in merged.items()),
    ]
    return "\n".join(lines) + "\n"
