"""A site after a real (in-process) federation run: the files ``fediim local-deploy``
leaves (site TOML, schema, data, ledger, bank, signature, pinned key), with a ``[serve]``
table and a token, and a live service over them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fediim.protocol.site_config import ServeSettings, load_site_config, site_config_toml
from fediim.serve.app import create_app
from fediim.serve.auth import load_token
from fediim.serve.service import ServiceState
from fediim.serve.site import Site
from tests.apps.test_flower_apps import COLUMNS, _federation, _run, _table, _write_csv

TOKEN = "serve-test-token-0123456789abcdef"


@pytest.fixture(scope="session")
def deployed_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TOML of a site whose output_dir holds the bank of a real (in-process) run (one
    per test session: no test changes its files; those that spoil a bank spoil copies)."""
    layout = _federation(tmp_path_factory.mktemp("federation"))
    _run(layout)
    return layout.sites[0].config


def serving_toml(site_config: Path, directory: Path, **serve: Any) -> Path:
    """A copy of the site's TOML in ``directory`` with a ``[serve]`` table (a 0600 token
    file unless ``token_file``/``token_env`` says otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    if "token_env" not in serve and "token_file" not in serve:
        token_file = directory / "serve.token"
        token_file.write_text(TOKEN + "\n", encoding="utf-8")
        token_file.chmod(0o600)
        serve["token_file"] = token_file
    config = load_site_config(site_config).model_copy(
        update={"serve": ServeSettings.model_validate(serve)})
    path = directory / "site.toml"
    path.write_text(site_config_toml(config), encoding="utf-8")
    return path


def new_rows(seed: int, n: int, shift: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
             ) -> np.ndarray:
    """Rows like the federation's (seed >= 10: not any site's own rows), moved by
    ``shift`` per column."""
    return _table(seed, n) + np.asarray(shift)


def write_rows(path: Path, x: np.ndarray) -> Path:
    _write_csv(path, x)
    return path


def json_rows(x: np.ndarray) -> dict[str, Any]:
    """The request body for ``x`` (NaN as null)."""
    return {"rows": [{c: None if np.isnan(v) else float(v) for c, v in zip(COLUMNS, row,
                                                                            strict=True)}
                     for row in x]}


@pytest.fixture(scope="session")
def serving_site(deployed_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The site prepared for serving, monitoring every complete row (its engine's plans,
    made by the first service, are read only after that: services may share it)."""
    return Site.open(serving_toml(deployed_site, tmp_path_factory.mktemp("serving"),
                                  monitor_fraction=1.0))


@pytest.fixture
def service(serving_site: Site) -> Iterator[tuple[ServiceState, TestClient]]:
    """A fresh live service (counters, monitors) and a client holding the token."""
    site = serving_site
    state = ServiceState(site, rng=np.random.default_rng(0))
    client = TestClient(create_app(state, load_token(site.config.serve)))
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    with client:
        yield state, client
