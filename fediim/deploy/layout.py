"""The files of a local federation: coordinator keys, per-site TOMLs, the Flower app."""


from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fediim.errors import DeployError
from fediim.io.atomic import atomic_write_text
from fediim.io.toml import toml_string, toml_value
from fediim.protocol.run_config import RUN_CONFIG_DEFAULTS
from fediim.protocol.site_config import SITE_ID_PATTERN

__all__ = ["APP_DIR_NAME", "FederationLayout", "SiteLayout", "app_pyproject", "prepare_federation"]

APP_DIR_NAME = "fediim-app"


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
    allow_seeded_noise: bool = False,
    run_config: dict[str, Any] | None = None,
) -> FederationLayout:
    """Write the coordinator key and one site TOML per data file under ``out``.

    Each site's budget is ``budget_epsilon`` (default: this run's ``epsilon``) at ``delta``.
    An existing signing key in ``out/coordinator`` is reused, and existing ledgers are kept:
    spend accumulates across runs into the same ``out``.
    """
    from fediim.io.schema import load_schema
    from fediim.privacy import PrivacyLedger
    from fediim.protocol.signing import load_private_key, write_keypair
    from fediim.protocol.site_config import Budget, SiteConfig, site_config_toml

    out_dir = Path(out).resolve()
    schema_path = Path(schema).resolve()
    load_schema(schema_path).bounds_array()  # fail early, naming the file
    files = [Path(path).resolve() for path in data]
    if not files:
        raise DeployError("at least one --data file is needed")
    ids = list(site_ids) if site_ids is not None else _site_ids(files)
    if len(ids) != len(files) or len(set(ids)) != len(ids):
        raise DeployError(f"need one unique site id per data file, got {ids}")
    coordinator_dir = out_dir / "coordinator"
    coordinator_dir.mkdir(parents=True, exist_ok=True)
    key, public_key = coordinator_dir / "signing.key", coordinator_dir / "coordinator.pub"
    if key.exists() and public_key.exists():
        load_private_key(key)
    else:
        write_keypair(key, public_key)
    budget = Budget(epsilon=budget_epsilon if budget_epsilon is not None else epsilon,
                    delta=delta)
    sites = []
    for site_id, data_file in zip(ids, files, strict=True):
        site_dir = out_dir / site_id
        site_dir.mkdir(parents=True, exist_ok=True)
        config = SiteConfig(site_id=site_id, data=data_file, schema=schema_path,
                            ledger=site_dir / "ledger.json", output_dir=site_dir,
                            coordinator_public_key=public_key, budget=budget,
                            insecure_seeded_noise=allow_seeded_noise)
        atomic_write_text(site_dir / "site.toml", site_config_toml(config))
        if not config.ledger.exists():  # a site never runs without its ledger: create it
            PrivacyLedger.create(config.ledger, budget.rho, site_id)
        sites.append(SiteLayout(site_id, data_file, site_dir, site_dir / "site.toml",
                                site_dir / "ledger.json"))
    run = {
        "schema": str(schema_path), "signing-key": str(key), "out-dir": str(coordinator_dir),
        "min-sites": int(min_sites if min_sites is not None else len(files)),
        "expected-sites": len(files), "epsilon": float(epsilon), "delta": float(delta),
        **(run_config or {}),
    }
    return FederationLayout(out_dir, schema_path, coordinator_dir, key, public_key,
                            tuple(sites), run)


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
