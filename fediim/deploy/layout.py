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
    for p in data:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem).strip("-._") or "site"
        if not re.match(SITE_ID_PATTERN, base):
            base = ("site-" + base)[:64]
        sid, i = base, 2
        while sid in ids:
            sid, i = f"{base}-{i}", i + 1
        ids.append(sid)
    return ids


def prepare_federation(
    data: Sequence[str | os.PathLike[str]],
    schema: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epsilon: float = 1.0,
    delta: float = 1e-6,
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
    from fediim.protocol.signing import load_private_key, write_keypair
    from fediim.protocol.site_config import Budget, SiteConfig, site_config_toml

    out_dir = Path(out).resolve()
    schema_path = Path(schema).resolve()
    load_schema(schema_path).bounds_array()  # fail early, naming the file
    files = [Path(p).resolve() for p in data]
    if not files:
        raise DeployError("at least one --data file is needed")
    ids = list(site_ids) if site_ids is not None else _site_ids(files)
    if len(ids) != len(files) or len(set(ids)) != len(ids):
        raise DeployError(f"need one unique site id per data file, got {ids}")
    coord = out_dir / "coordinator"
    coord.mkdir(parents=True, exist_ok=True)
    key, pub = coord / "signing.key", coord / "coordinator.pub"
    if key.exists() and pub.exists():
        load_private_key(key)
    else:
        write_keypair(key, pub)
    budget = Budget(epsilon=budget_epsilon if budget_epsilon is not None else epsilon,
                    delta=delta)
    sites = []
    for sid, f in zip(ids, files, strict=True):
        d = out_dir / sid
        d.mkdir(parents=True, exist_ok=True)
        cfg = SiteConfig(site_id=sid, data=f, schema=schema_path, ledger=d / "ledger.json",
                         output_dir=d, coordinator_public_key=pub, budget=budget,
                         allow_seeded_noise=allow_seeded_noise)
        atomic_write_text(d / "site.toml", site_config_toml(cfg))
        sites.append(SiteLayout(sid, f, d, d / "site.toml", d / "ledger.json"))
    rc = {
        "schema": str(schema_path), "signing-key": str(key), "out-dir": str(coord),
        "min-sites": int(min_sites if min_sites is not None else len(files)),
        "expected-sites": len(files), "epsilon": float(epsilon), "delta": float(delta),
        **(run_config or {}),
    }
    return FederationLayout(out_dir, schema_path, coord, key, pub, tuple(sites), rc)


def app_pyproject(run_config: dict[str, Any]) -> str:
    """A minimal Flower app: the installed ``coordinator``/``site_client`` apps + config."""
    from fediim.protocol.messages import RUN_CONFIG_DEFAULTS

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
