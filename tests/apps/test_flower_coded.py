"""Coded columns (binary, categorical, ordinal) through the real ServerApp and ClientApps:
the sites release their one-hot encoded tables exactly as the in-process
``FederatedIIM(column_kinds=...)`` does (the same bank, bit for bit, with the same seeds),
impute declared levels with their probabilities; summed securely, the same holds against
``FederatedIIM(aggregation="secure", column_kinds=...)``, and a site refuses a secure
request that is not over its schema's encoding before paying for it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, RecordDict

from fediim.cli import main
from fediim.deploy.layout import FederationLayout, prepare_federation
from fediim.federated import FederatedIIM
from fediim.federated.bank import ModelBank
from fediim.federated.secure_release import gram_share_sensitivity, moments_sensitivity
from fediim.io.outputs import format_level
from fediim.io.schema import TableSchema, load_schema
from fediim.io.table import read_csv
from fediim.privacy import PrivacyLedger, epsilon_to_rho
from fediim.protocol.messages import ARRAYS_RECORD
from fediim.protocol.secure_sum import MaskedInputRequest
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
    """A completed in-process run over three mixed tables, each site releasing its cells."""
    layout = _coded_federation(tmp_path_factory.mktemp("coded"), aggregation="per-site")
    _run(layout)
    return layout


@pytest.fixture(scope="module")
def coded_secure_run(tmp_path_factory: pytest.TempPathFactory) -> FederationLayout:
    """The same three tables summed securely ("auto" with 3 sites)."""
    layout = _coded_federation(tmp_path_factory.mktemp("coded_secure"), aggregation="auto")
    _run(layout)
    return layout


def _equals_in_process(layout: FederationLayout, aggregation: str) -> FederatedIIM:
    """Check the Flower run's bank, ledgers, imputed levels and probability flags against
    ``FederatedIIM(column_kinds=..., aggregation=...)`` with the same seeds; return it."""
    schema = load_schema(layout.schema)
    sites = sorted(layout.sites, key=lambda s: s.site_id)
    tables = [read_csv(s.data, schema=schema).values for s in sites]
    fed = FederatedIIM(epsilon=4.0, delta=1e-6, bounds=schema.bounds_array(), seed=1234,
                       aggregation=aggregation, column_kinds=schema.code_kinds()
                       ).fit(tables, site_ids=[s.site_id for s in sites])
    got = ModelBank.from_bytes((layout.coordinator_dir / "bank.npz").read_bytes())
    want = fed.bank_
    assert got.n_cells == want.n_cells > 0 and got.n_features == want.n_features == 8
    for name in ("site", "cell", "lo", "hi", "gram", "sigma", "tree", "clip_lo", "clip_hi"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    # the coded columns (sex: 1; cp: 2-5; grade: 7) keep the public coordinates
    for column in (1, 2, 3, 4, 5, 7):
        assert np.all(got.clip_lo[:, column] == -0.5) and np.all(got.clip_hi[:, column] == 0.5)
    for s, mem in zip(sites, fed.ledgers_, strict=True):
        disk = PrivacyLedger.open(s.ledger, epsilon_to_rho(4.0, 1e-6), s.site_id)
        assert [e.rho for e in disk.entries] == pytest.approx([e.rho for e in mem.entries])
        assert [(e.sensitivity_l2, e.purpose) for e in disk.entries] == [
            (e.sensitivity_l2, e.purpose) for e in mem.entries]
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
    return fed


def test_coded_flower_bank_and_levels_equal_the_in_process_federated_iim(
        coded_run: FederationLayout) -> None:
    view = _view(coded_run)
    assert view["status"] == "completed" and view["aggregation"] == "per-site"
    _equals_in_process(coded_run, "per-site")


def test_coded_secure_bank_and_levels_equal_the_in_process_secure_federated_iim(
        coded_secure_run: FederationLayout) -> None:
    view = _view(coded_secure_run)
    assert view["status"] == "completed", view["error"]
    assert view["aggregation"] == "secure" and view["bank"]["sites"] == ["federation"]
    fed = _equals_in_process(coded_secure_run, "secure")
    assert fed.bank_.meta["aggregation"] == "secure"
    # moments over every column, only the numeric ones (age: 0, pressure: 6) rotated; the
    # one-hot blocks in public coordinates, the Gram sum at their sensitivity (one column
    # per block)
    blocks = [[1], [2, 3, 4, 5]]
    sensitivity = gram_share_sensitivity(8, fed.plan_.n_trees, blocks)
    assert sensitivity < gram_share_sensitivity(8, fed.plan_.n_trees)
    assert view["secure"]["columns"] == {"encoded": 8, "clipped": [0, 6],
                                         "onehot_blocks": blocks,
                                         "gram_sensitivity": sensitivity}
    assert view["secure"]["statistics"] == ["moments", "counts", "grams"]
    assert view["secure"]["rounds"][0]["in_handshake"]  # the handshake asked 3 sums
    for s in coded_secure_run.sites:
        entries = PrivacyLedger.open(s.ledger, epsilon_to_rho(4.0, 1e-6), s.site_id).entries
        assert [e.mechanism for e in entries] == ["distributed discrete gaussian"] * 3
        # the moments: the augmented Gram's upper triangle over the 8 encoded columns, at one
        # leaf Gram's sensitivity (the one-hot blocks counted as one column each)
        assert entries[0].dimension == 9 * 10 // 2
        assert entries[0].sensitivity_l2 == pytest.approx(moments_sensitivity(8, blocks))
        assert entries[2].sensitivity_l2 == sensitivity
        assert "2 one-hot block(s) counted as one column each" in entries[2].purpose


def _as_the_table_columns(node: int, group: str, content: RecordDict) -> RecordDict:
    """The coordinator asks node 101 for a Gram vector over the table's 5 columns, not the
    schema's 8 encoded ones."""
    if node == 101 and group == "secure:grams:masked_input":
        arrays = content.array_records[ARRAYS_RECORD]
        asked = MaskedInputRequest.decode(arrays["secagg"].numpy().tobytes())
        wrong = asked.model_copy(update={"length": asked.length // 45 * 21}).encode()
        arrays["secagg"] = Array(np.frombuffer(wrong, dtype=np.uint8).copy())
    return content


def _narrowing_a_coded_column(node: int, group: str, content: RecordDict) -> RecordDict:
    """The coordinator sends node 101 a box that moves the zero indicators of cp (encoded
    column 2) off zero."""
    if node == 101 and group == "secure:counts:masked_input":
        arrays = content.array_records[ARRAYS_RECORD]
        state = json.loads(arrays["public_state"].numpy().tobytes())
        state["box"][0][2] = float.hex(0.1)
        arrays["public_state"] = Array(np.frombuffer(
            json.dumps(state).encode(), dtype=np.uint8).copy())
    return content


@pytest.mark.parametrize(("tamper", "stage", "paid"), [
    (_as_the_table_columns, "secure:grams:masked_input", ["secure sum 1", "secure sum 2"]),
    (_narrowing_a_coded_column, "secure:counts:masked_input", ["secure sum 1"]),
])
def test_a_secure_request_off_the_schema_encoding_is_refused_before_it_is_paid(
        tmp_path: Path, tamper: object, stage: str, paid: list[str]) -> None:
    layout = _coded_federation(tmp_path, aggregation="secure")
    _run(layout, tamper=tamper)
    view = _view(layout)
    first = sorted(s.site_id for s in layout.sites)[0]
    assert view["sites"][first]["stages"][stage]["code"] == "secure_refused"
    site = next(s for s in layout.sites if s.site_id == first)
    entries = PrivacyLedger.open(site.ledger, epsilon_to_rho(4.0, 1e-6), first).entries
    assert [e.purpose.split(":")[0] for e in entries] == paid  # nothing for the refused sum
    assert view["status"] == "completed"  # the other two sum without it (t = 2)


def _declared_label_rows(path: Path, schema: TableSchema) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a written table, asserting every coded cell is a declared
    label."""
    with open(path, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    for name in CODED:
        j = header.index(name)
        levels = {format_level(level) for level in schema.column(name).levels}
        assert {row[j] for row in rows} <= levels
    return header, rows


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
    header, rows = _declared_label_rows(out, schema)
    for name in CODED:
        j = header.index(name)
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


def test_impute_site_config_multiple_draws_declared_levels(
        coded_run: FederationLayout, tmp_path: Path) -> None:
    site = sorted(coded_run.sites, key=lambda s: s.site_id)[0]
    schema = load_schema(coded_run.schema)
    _mixed_csv(tmp_path / "today.csv", n=60, seed=19)
    out = tmp_path / "out.csv"
    assert main(["impute", str(tmp_path / "today.csv"), "-o", str(out), "--site-config",
                 str(site.config), "--multiple", "3", "--seed", "2"]) == 0
    table = read_csv(tmp_path / "today.csv", schema=schema).values
    drawn = []
    for number in (1, 2, 3):
        path = tmp_path / f"out.imp{number}.csv"
        values = read_csv(path, schema=schema).values
        np.testing.assert_array_equal(values[~np.isnan(table)], table[~np.isnan(table)])
        _declared_label_rows(path, schema)
        drawn.append(values)
    missing = np.isnan(table)
    coded = [schema.column_names.index(name) for name in CODED]
    assert missing[:, coded].any()  # coded gaps to draw
    assert any(not np.array_equal(drawn[0][missing], d[missing]) for d in drawn[1:])
