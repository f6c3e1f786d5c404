"""Coded columns (binary, categorical, ordinal) through the real ServerApp and ClientApps:
the sites release their one-hot encoded tables exactly as the in-process
``FederatedIIM(column_kinds=...)`` does (the same bank, bit for bit, with the same seeds),
impute declared levels with their probabilities, and a secure run is refused or falls back
to per-site releases."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fediim.cli import main
from fediim.deploy.layout import FederationLayout, prepare_federation
from fediim.errors import ConfigError
from fediim.federated import FederatedIIM
from fediim.federated.bank import ModelBank
from fediim.io.outputs import format_level
from fediim.io.schema import load_schema
from fediim.io.table import read_csv
from fediim.privacy import PrivacyLedger, epsilon_to_rho
from fediim.serve.service import ServiceState
from fediim.serve.site import Site
from tests.apps.test_flower_apps import _run, _view
from tests.cli.test_mixed_csv import SCHEMA, _mixed_csv

CODED = ("sex", "cp", "grade")


def _coded_federation(tmp_path: Path, **run: object) -> FederationLayout:
    data = []
    for number in range(3):
        path = tmp_path / "data" / f"site{'abc'[number]}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        _mixed_csv(path, n=(200, 160, 140)[number], seed=number)
        data.append(path)
    schema = tmp_path / "schema.toml"
    schema.write_text('missing = [""]\n' + SCHEMA, encoding="utf-8")
    return prepare_federation(data, schema, tmp_path / "out", epsilon=4.0, delta=1e-6,
                              min_sites=2, insecure_seeded_noise=True,
                              run_config={"seed": 1234, **run})


def _flags(path: Path) -> dict[str, list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    return {name: [row[j] for row in rows] for j, name in enumerate(header)}


@pytest.fixture(scope="module")
def coded_run(tmp_path_factory: pytest.TempPathFactory) -> FederationLayout:
    """A completed in-process run over three mixed tables (aggregation "auto")."""
    layout = _coded_federation(tmp_path_factory.mktemp("coded"))
    _run(layout)
    return layout


def test_coded_flower_bank_and_levels_equal_the_in_process_federated_iim(
        coded_run: FederationLayout) -> None:
    layout = coded_run  # aggregation "auto" with 3 sites: per-site, the schema is coded
    view = _view(layout)
    assert view["status"] == "completed" and view["aggregation"] == "per-site"
    schema = load_schema(layout.schema)
    sites = sorted(layout.sites, key=lambda s: s.site_id)
    tables = [read_csv(s.data, schema=schema).values for s in sites]
    fed = FederatedIIM(epsilon=4.0, delta=1e-6, bounds=schema.bounds_array(), seed=1234,
                       aggregation="per-site", column_kinds=schema.code_kinds()
                       ).fit(tables, site_ids=[s.site_id for s in sites])
    got = ModelBank.from_bytes((layout.coordinator_dir / "bank.npz").read_bytes())
    want = fed.bank_
    assert got.n_cells == want.n_cells > 0 and got.n_features == want.n_features == 8
    for name in ("site", "cell", "lo", "hi", "gram", "sigma", "clip_lo", "clip_hi"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    # the one-hot blocks (sex: column 1; cp: columns 2-5) keep the public coordinates
    for column in range(1, 6):
        assert np.all(got.clip_lo[:, column] == -0.5) and np.all(got.clip_hi[:, column] == 0.5)
    for s, mem in zip(sites, fed.ledgers_, strict=True):
        disk = PrivacyLedger.open(s.ledger, epsilon_to_rho(4.0, 1e-6), s.site_id)
        assert [e.rho for e in disk.entries] == pytest.approx([e.rho for e in mem.entries])
    for s, table, res in zip(sites, tables, fed.impute(tables), strict=True):
        out = read_csv(s.directory / "imputed.csv", schema=schema).values
        np.testing.assert_array_equal(out, res.values)  # codes of declared levels
        observed = ~np.isnan(table)
        np.testing.assert_array_equal(out[observed], table[observed])
        flags = _flags(s.directory / "flags.csv")
        for j, name in enumerate(schema.column_names):
            if name in ("sex", "cp"):
                imputed = np.isnan(table[:, j])
                assert imputed.any()
                probability = np.array([float(p) if p else np.nan
                                        for p in flags[f"{name}_probability"]])
                assert np.all(np.isnan(probability[~imputed]))
                np.testing.assert_allclose(probability[imputed], res.probability[imputed, j],
                                           rtol=1e-5)
                assert np.all(probability[imputed] >= 1.0 / len(schema.column(name).levels))


def test_secure_aggregation_with_coded_columns_is_refused_before_anything_is_spent(
        tmp_path: Path) -> None:
    layout = _coded_federation(tmp_path, aggregation="secure")
    with pytest.raises(ConfigError, match="coded columns"):
        _run(layout)
    assert all(not s.ledger.exists() or PrivacyLedger.open(
        s.ledger, epsilon_to_rho(4.0, 1e-6), s.site_id).spent_rho == 0 for s in layout.sites)


def test_impute_site_config_and_serve_give_levels_with_probabilities(
        coded_run: FederationLayout, tmp_path: Path) -> None:
    site = sorted(coded_run.sites, key=lambda s: s.site_id)[0]
    schema = load_schema(coded_run.schema)
    written = _mixed_csv(tmp_path / "today.csv", n=60, seed=17)
    out = tmp_path / "out.csv"
    assert main(["impute", str(tmp_path / "today.csv"), "-o", str(out), "--site-config",
                 str(site.config)]) == 0
    table = read_csv(tmp_path / "today.csv", schema=schema).values
    imputed = read_csv(out, schema=schema).values
    assert not np.isnan(imputed).any()
    np.testing.assert_array_equal(imputed[~np.isnan(table)], table[~np.isnan(table)])
    with open(out, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    for name in CODED:
        j = header.index(name)
        levels = {format_level(level) for level in schema.column(name).levels}
        assert {row[j] for row in rows} <= levels
        assert {row[j] for row, before in zip(rows, written, strict=True) if not before[j]}
    flags = _flags(tmp_path / "out.flags.csv")
    # the service imputes the same rows alike, from the same prepared engine
    served = ServiceState(Site.open(site.config)).impute(table).result
    np.testing.assert_array_equal(served.values, imputed)
    for name in ("sex", "cp"):
        j = schema.column_names.index(name)
        missing = np.isnan(table[:, j])
        probability = np.array([float(p) if p else np.nan
                                for p in flags[f"{name}_probability"]])
        np.testing.assert_allclose(probability[missing], served.probability[missing, j],
                                   rtol=1e-5)
        assert np.all((probability[missing] > 0) & (probability[missing] <= 1))
