"""Hardening of a site against a curious coordinator and a careless operator (issue 12).

The tests drive the site's real stage handler (:func:`site_client.site.handle`) as its
ClientApp does, with a coordinator key held by the test: what a reply may carry, which banks
the site uses, the budget rules it owns, its ledger, its outputs and its public files. A
"neighbour" is the same site with one record more (D and D + one record): whatever a
coordinator sends, the two must answer alike.
"""

from __future__ import annotations

import copy
import io
import json
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import RecordDict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fediim.federated.site_imputation as site_imputation
import site_client.site as site_module
from fediim.federated.bank import ModelBank
from fediim.io.schema import TableSchema, load_schema
from fediim.io.table import read_csv, write_csv
from fediim.privacy import PrivacyLedger, epsilon_to_rho
from fediim.protocol.messages import (
    CONFIG_RECORD,
    HandshakeReply,
    HandshakeRequest,
    ImputeReply,
    ImputeRequest,
    ReleaseReply,
    ReleaseRequest,
)
from fediim.protocol.signing import key_id, load_private_key, sign_bank, write_keypair
from fediim.protocol.site_config import load_site_config
from site_client.site import STATE_RECORD, handle
from tests.fake_clock import FakeClock

COLUMNS = ["a", "b", "c"]
BOUNDS = [(0.0, 10.0), (-5.0, 5.0), (0.0, 100.0)]
RUN_ID = 77
DELTA = 1e-6
EPSILON = 2.0
BUDGET_EPSILON = 8.0
OUTPUTS = ["audit.jsonl", "bank.npz", "bank.sig.json", "flags.csv", "imputed.csv"]


def _table(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(1, 9, n)
    x = np.column_stack([a, rng.normal(0, 1, n), 10 * a + rng.normal(0, 3, n)])
    x[rng.random(n) < 0.15, 2] = np.nan
    return x


def _write_csv(path: Path, x: np.ndarray) -> None:
    write_csv(path, x, COLUMNS, float_format=None)  # exact values, NaN as empty


@dataclass
class Coordinator:
    """The test's coordinator: the schema every site shares and the key sites pin."""

    root: Path
    key: Ed25519PrivateKey = field(init=False)
    schema: Path = field(init=False)
    public_key: Path = field(init=False)

    schema_hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_key = self.root / "coordinator.pub"
        write_keypair(self.root / "signing.key", self.public_key)
        self.key = load_private_key(self.root / "signing.key")
        self.schema = self.root / "schema.toml"
        self.schema.write_text(TableSchema.model_validate({"columns": [
            {"name": c, "bounds": b} for c, b in zip(COLUMNS, BOUNDS, strict=True)]}).to_toml())
        self.schema_hash = load_schema(self.schema).schema_hash()

    def privacy(self, request: type[HandshakeRequest | ReleaseRequest] = HandshakeRequest,
                **changes: Any) -> HandshakeRequest | ReleaseRequest:
        fields = {"schema_hash": self.schema_hash, "coordinator_key_id": key_id(self.key),
                  "epsilon": EPSILON, "delta": DELTA, **changes}
        return request(**fields)

    def impute_request(self, bank: bytes, run_id: int = RUN_ID) -> ImputeRequest:
        return ImputeRequest(schema_hash=self.schema_hash, coordinator_key_id=key_id(self.key),
                             bank=bank, signature=sign_bank(self.key, bank, self.schema_hash,
                                                            run_id))


@dataclass
class Site:
    """One site's files and its per-run state, answering through ``handle``."""

    directory: Path
    state: RecordDict = field(default_factory=RecordDict)

    @property
    def config(self) -> Path:
        return self.directory / "site.toml"

    @property
    def ledger(self) -> Path:
        return self.directory / "ledger.json"

    @property
    def out(self) -> Path:
        return self.directory / "out"

    def send(self, request: Any, run_id: int = RUN_ID) -> RecordDict:
        return handle(request.to_record(), node_config={"site-config": str(self.config)},
                      run_id=run_id, node_id=5, state=self.state)

    def release(self, coordinator: Coordinator, **changes: Any) -> ReleaseReply:
        return ReleaseReply.from_record(self.send(coordinator.privacy(ReleaseRequest,
                                                                      **changes)))

    def impute(self, coordinator: Coordinator, bank: bytes,
               run_id: int = RUN_ID) -> ImputeReply:
        return ImputeReply.from_record(self.send(coordinator.impute_request(bank, run_id),
                                                 run_id))

    def imputed(self) -> np.ndarray:
        return read_csv(self.out / "imputed.csv").values


def make_site(root: Path, coordinator: Coordinator, x: np.ndarray, *, site_id: str = "hosp",
              budget: str = "", top: str = "", ledger: bool = True) -> Site:
    """A site in ``root`` over ``x``; ``budget``/``top``: extra TOML lines of its [budget]
    table and of its top level."""
    root.mkdir(parents=True)
    _write_csv(root / "data.csv", x)
    (root / "site.toml").write_text(
        f'site_id = "{site_id}"\ndata = "data.csv"\nschema = "{coordinator.schema}"\n'
        f'ledger = "ledger.json"\noutput_dir = "out"\n'
        f'coordinator_public_key = "{coordinator.public_key}"\n{top}\n'
        f"[budget]\nepsilon = {BUDGET_EPSILON}\ndelta = {DELTA}\n{budget}\n")
    if ledger:
        PrivacyLedger.create(root / "ledger.json", epsilon_to_rho(BUDGET_EPSILON, DELTA),
                             site_id)
    return Site(root)


@dataclass
class Neighbours:
    """Sites D and D + one record (same id, same plan), each after its release in RUN_ID,
    and the honest cells of another site."""

    coordinator: Coordinator
    sites: tuple[Site, Site]
    own: tuple[ModelBank, ModelBank]
    other: ModelBank
    released_state: tuple[RecordDict, RecordDict]
    records: list[RecordDict] = field(default_factory=list)

    def impute_both(self, other: ModelBank | None = None,
                    bank_bytes: bytes | None = None) -> tuple[ImputeReply, ImputeReply]:
        """Each site's reply to a bank of its own cells and ``other`` (default: the other
        site's honest cells), or to ``bank_bytes``, from a fresh copy of its state after its
        release; the reply records are kept in :attr:`records`."""
        self.records = []
        for site, own, state in zip(self.sites, self.own, self.released_state, strict=True):
            site.state = copy.deepcopy(state)
            data = bank_bytes if bank_bytes is not None else _bank_bytes(
                own, self.other if other is None else other)
            request = self.coordinator.impute_request(data)
            self.records.append(site.send(request))
        first, second = (ImputeReply.from_record(record) for record in self.records)
        return first, second


def _bank_bytes(own: ModelBank, other: ModelBank) -> bytes:
    """The federation's bank of two sites' cells, as the coordinator assembles it, but
    serialised whatever the cells hold (a crafted count or ``min_records`` included)."""
    bank = copy.copy(own)  # fields set one by one: ModelBank's own checks are not run
    for name in ("site", "cell", "lo", "hi", "gram", "sigma", "tree", "clip_lo",
                 "clip_hi", "observed"):
        setattr(bank, name, np.concatenate([getattr(own, name), getattr(other, name)]))
    bank.min_records = min(own.min_records, other.min_records)
    bank.meta = {"epsilon": EPSILON, "delta": DELTA}
    return bank.to_bytes()


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory: pytest.TempPathFactory) -> Neighbours:
    root = tmp_path_factory.mktemp("neighbours")
    coordinator = Coordinator(root / "coordinator")
    x = _table(0, 200)
    plus_one = np.vstack([x, [5.0, 0.0, np.nan]])
    sites = (make_site(root / "d", coordinator, x),
             make_site(root / "d_plus_one", coordinator, plus_one))
    other_site = make_site(root / "other", coordinator, _table(1, 250), site_id="other")
    releases = [site.release(coordinator) for site in (*sites, other_site)]
    assert all(reply.ok and reply.bank for reply in releases)
    banks = [ModelBank.from_bytes(reply.bank) for reply in releases]  # type: ignore[arg-type]
    assert all(bank.n_cells > 0 for bank in banks)
    return Neighbours(coordinator, sites, (banks[0], banks[1]), banks[2],
                      (copy.deepcopy(sites[0].state), copy.deepcopy(sites[1].state)))


def _without_ledger(reply: ImputeReply) -> dict[str, Any]:
    return reply.model_dump(exclude={"ledger"})


# -- Finding 1: nothing computed from the records leaves the site, and no query is free ----


def test_the_impute_reply_is_a_status_without_counts(neighbours: Neighbours) -> None:
    """Finding 1: the impute reply carried n_rows / n_incomplete_rows / n_imputed_cells of
    the true table; D and D + one record must now give the same reply."""
    first, second = neighbours.impute_both()
    assert first.code == second.code == "ok"
    assert _without_ledger(first) == _without_ledger(second)
    for record in neighbours.records:
        assert set(record.config_records[CONFIG_RECORD]) == {"protocol", "stage", "site_id",
                                                             "code"}
    for site in neighbours.sites:  # the counts stay at the site, in its own outputs
        assert not np.isnan(site.imputed()).any()


def test_an_impute_needs_this_runs_release_and_is_answered_once(tmp_path: Path) -> None:
    """Finding 1: an impute-only run needed no release, so a coordinator could query a site
    without limit and without charge."""
    coordinator = Coordinator(tmp_path / "coordinator")
    site = make_site(tmp_path / "site", coordinator, _table(0, 150))
    other = make_site(tmp_path / "other", coordinator, _table(1, 150), site_id="other")
    other_cells = ModelBank.from_bytes(other.release(coordinator).bank)  # type: ignore[arg-type]
    assert site.impute(coordinator, other_cells.to_bytes()).code == "not_in_run"
    assert not site.out.exists()
    own = ModelBank.from_bytes(site.release(coordinator).bank)  # type: ignore[arg-type]
    bank = _bank_bytes(own, other_cells)
    assert site.impute(coordinator, bank, run_id=RUN_ID + 1).code == "not_in_run"
    assert site.impute(coordinator, bank).code == "ok"
    assert site.impute(coordinator, bank).code == "not_in_run"  # once per release


def test_refusals_and_failures_carry_a_fixed_reason(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 1 (review finding 8): error replies carried the line and column of a bad
    cell, or an exception's type and text."""
    from fediim.protocol.messages import REPLY_REASONS, ReplyCode

    coordinator = Coordinator(tmp_path / "coordinator")
    site = make_site(tmp_path / "site", coordinator, _table(0, 60))
    lines = (site.directory / "data.csv").read_text().splitlines()
    lines[7] = "1.5,Smith,3"
    (site.directory / "data.csv").write_text("\n".join(lines) + "\n")
    reply = HandshakeReply.from_record(site.send(coordinator.privacy()))
    assert reply.code == "bad_data" and reply.reason == REPLY_REASONS[ReplyCode.BAD_DATA]

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail 42")

    _write_csv(site.directory / "data.csv", _table(0, 60))
    monkeypatch.setattr(site_module, "site_release", explode)
    record = site.send(coordinator.privacy(ReleaseRequest))
    reply = ReleaseReply.from_record(record)
    assert reply.code == "error" and reply.reason == REPLY_REASONS[ReplyCode.ERROR]
    texts = [str(v) for v in record.config_records[CONFIG_RECORD].values()]
    assert not [t for t in texts if "secret" in t or "RuntimeError" in t or "line" in t]


# -- Finding 2: a crafted bank is refused whatever the site's data ---------------------------


def _crafted(cells: ModelBank, how: str) -> ModelBank:
    """Another site's cells, crafted: degenerate, non-finite or with the wrong noise."""
    out = cells.select(np.ones(cells.n_cells, dtype=bool))
    if how == "sigma_zero":
        out.sigma[:] = 0.0
    elif how == "wrong_sigma":
        out.sigma[:] *= 0.5
    elif how == "lo_equals_hi":
        out.hi[0] = out.lo[0]
    elif how == "nan":
        out.gram[0, 1, 1] = np.nan
    elif how == "inf":
        out.lo[0, 0] = -np.inf
    elif how == "x1_is_x0":  # the second attribute a copy of the first
        out.gram[:, 2, :] = out.gram[:, 1, :]
        out.gram[:, :, 2] = out.gram[:, :, 1]
    elif how == "tiny_cell":  # a cell describing one record
        out.gram[0] *= 1.0 / out.gram[0, 0, 0]
        object.__setattr__(out, "min_records", 1)
    return out


@pytest.mark.parametrize("how", ["sigma_zero", "wrong_sigma", "lo_equals_hi", "nan", "inf",
                                 "tiny_cell"])
def test_a_crafted_bank_is_refused_whatever_the_data(neighbours: Neighbours, how: str) -> None:
    """Finding 2: a crafted bank turned the impute reply into an oracle on the records."""
    first, second = neighbours.impute_both(_crafted(neighbours.other, how))
    assert first.code == second.code == "bad_bank"
    assert _without_ledger(first) == _without_ledger(second)


def test_a_degenerate_bank_that_passes_vetting_answers_alike(neighbours: Neighbours) -> None:
    """Finding 2: a bank whose cells are degenerate but within the plan (one attribute a
    copy of another) gets the same reply from D and D + one record, and if it is used, the
    imputation completes."""
    first, second = neighbours.impute_both(_crafted(neighbours.other, "x1_is_x0"))
    assert first.code == second.code and first.code in ("ok", "bad_bank")
    assert _without_ledger(first) == _without_ledger(second)
    if first.ok:
        for site in neighbours.sites:
            assert not np.isnan(site.imputed()).any()


def _raise_linalg(*args: object, **kwargs: object) -> None:
    raise np.linalg.LinAlgError("Matrix is not positive definite")


def _raise_index(*args: object, **kwargs: object) -> None:
    raise IndexError("index 3 is out of bounds")


@pytest.mark.parametrize(("target", "name", "failure"), [
    (site_imputation, "pattern_models", _raise_linalg),
    (site_imputation, "site_impute", _raise_index),
])
def test_a_numerical_failure_from_a_vetted_bank_falls_back_with_the_same_reply(
        neighbours: Neighbours, monkeypatch: pytest.MonkeyPatch, target: Any, name: str,
        failure: Callable[..., None]) -> None:
    """Finding 2: a failure while imputing from a bank that passes vetting fills the cells
    with the site's own IIM (method 'fallback') and never changes the reply."""
    monkeypatch.setattr(target, name, failure)
    first, second = neighbours.impute_both()
    assert first.code == second.code == "ok"
    for site in neighbours.sites:
        assert not np.isnan(site.imputed()).any()
        assert '"method": "fallback"' in (site.out / "audit.jsonl").read_text()


# -- Finding 3: the site converts at its own delta and caps one run ------------------------


def test_a_request_at_another_delta_is_refused(tmp_path: Path) -> None:
    """Finding 3: the site converted the request's epsilon at the request's delta, so
    epsilon = 1 at delta = 0.01 cost what epsilon ~ 2.18 costs at the site's delta."""
    coordinator = Coordinator(tmp_path / "coordinator")
    site = make_site(tmp_path / "site", coordinator, _table(0, 150))
    before = site.ledger.read_bytes()
    for request in (HandshakeRequest, ReleaseRequest):
        record = site.send(coordinator.privacy(request, epsilon=1.0, delta=0.01))
        assert record.config_records[CONFIG_RECORD]["code"] == "delta_mismatch"
    assert site.ledger.read_bytes() == before


def test_a_request_above_the_sites_cap_per_run_is_refused(tmp_path: Path) -> None:
    """Finding 3: one run could spend the whole budget; ``[budget] max_epsilon_per_run``
    caps it."""
    coordinator = Coordinator(tmp_path / "coordinator")
    site = make_site(tmp_path / "site", coordinator, _table(0, 150),
                     budget="max_epsilon_per_run = 1.0")
    before = site.ledger.read_bytes()
    for request in (HandshakeRequest, ReleaseRequest):
        record = site.send(coordinator.privacy(request, epsilon=1.5))
        assert record.config_records[CONFIG_RECORD]["code"] == "run_cap_exceeded"
    assert site.ledger.read_bytes() == before
    assert HandshakeReply.from_record(site.send(coordinator.privacy(epsilon=1.0))).ok
    above = make_site(tmp_path / "above", coordinator, _table(0, 10),
                      budget=f"max_epsilon_per_run = {2 * BUDGET_EPSILON}")
    with pytest.raises(ValueError, match="max_epsilon_per_run"):
        load_site_config(above.config)


# -- Finding 4: no ledger, no run -----------------------------------------------------------


def test_a_site_without_its_ledger_refuses_and_creates_none(tmp_path: Path) -> None:
    """Finding 4: a missing ledger was created afresh (spent 0) when a stage opened it."""
    coordinator = Coordinator(tmp_path / "coordinator")
    site = make_site(tmp_path / "site", coordinator, _table(0, 150), ledger=False)
    for request in (HandshakeRequest, ReleaseRequest):
        record = site.send(coordinator.privacy(request))
        assert record.config_records[CONFIG_RECORD]["code"] == "ledger_missing"
    assert not site.ledger.exists()


def test_prepare_federation_creates_every_sites_ledger(tmp_path: Path) -> None:
    """Finding 4: the local federation creates each site's ledger explicitly, and keeps an
    existing one."""
    from fediim.deploy.layout import prepare_federation

    coordinator = Coordinator(tmp_path / "coordinator")
    data = [tmp_path / "a.csv", tmp_path / "b.csv"]
    for path in data:
        _write_csv(path, _table(0, 20))
    layout = prepare_federation(data, coordinator.schema, tmp_path / "out", epsilon=2.0)
    for site in layout.sites:
        assert site.ledger.exists()
        cfg = load_site_config(site.config)
        assert PrivacyLedger.open(site.ledger, cfg.budget.rho, site.site_id).entries == ()
    kept = layout.sites[0].ledger.read_bytes()
    prepare_federation(data, coordinator.schema, tmp_path / "out", epsilon=2.0)
    assert layout.sites[0].ledger.read_bytes() == kept


# -- Finding 5: all outputs or none ----------------------------------------------------------


def test_the_sites_outputs_are_all_written_or_none(neighbours: Neighbours) -> None:
    """Finding 5: the site's outputs were renamed one by one, so a failure on one left the
    others written."""
    site = neighbours.sites[0]
    for name in OUTPUTS:
        (site.out / name).unlink(missing_ok=True)
    (site.out / "audit.jsonl").mkdir(parents=True)
    try:
        first, _ = neighbours.impute_both()
        assert first.code == "error"
        assert sorted(p.name for p in site.out.iterdir()) == ["audit.jsonl"]
    finally:
        (site.out / "audit.jsonl").rmdir()


def test_fediim_impute_writes_all_outputs_or_none(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 5: with the audit path a directory, ``fediim impute`` said nothing was
    written, but ``out.flags.csv`` was."""
    from fediim.cli import main

    _write_csv(tmp_path / "in.csv", _table(0, 40))
    (tmp_path / "out.audit.jsonl").mkdir()
    assert main(["impute", str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.csv")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.audit.jsonl"]
    assert "none of them was written" in capsys.readouterr().err


# -- Finding 6: seeded noise only on an explicitly insecure site, and visibly so -------------


def test_seeded_noise_needs_the_insecure_key_and_shows_in_the_ledger(tmp_path: Path) -> None:
    """Finding 6: seeded noise was allowed by ``allow_seeded_noise`` and the ledger view
    reported its epsilon as if the noise were private."""
    from fediim.errors import SiteConfigError

    coordinator = Coordinator(tmp_path / "coordinator")
    old = make_site(tmp_path / "old", coordinator, _table(0, 10),
                    top="allow_seeded_noise = true")
    with pytest.raises(SiteConfigError, match="insecure_seeded_noise"):
        load_site_config(old.config)
    site = make_site(tmp_path / "site", coordinator, _table(0, 150),
                     top="insecure_seeded_noise = true")
    reply = site.release(coordinator, seed=3, seed_index=0)
    assert reply.ok and reply.ledger is not None and reply.ledger.insecure_noise is True
    cfg = load_site_config(site.config)
    ledger = PrivacyLedger.open(site.ledger, cfg.budget.rho, "hosp")
    assert ledger.entries and all(entry.insecure_noise for entry in ledger.entries)
    assert ledger.summary(DELTA)["insecure_noise"] is True
    private = make_site(tmp_path / "private", coordinator, _table(0, 150))
    reply = private.release(coordinator)
    assert reply.ok and reply.ledger is not None and reply.ledger.insecure_noise is False


# -- Finding 7: public files are 0644 whatever the umask -------------------------------------


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_public_keys_and_certificates_are_0644_under_umask_0(tmp_path: Path,
                                                             umask_zero: None) -> None:
    """Finding 7: ``coordinator.pub`` and ``ca.crt`` took their mode from the umask (0666
    under umask 0)."""
    from fediim.protocol.tls import write_node_auth_keypair, write_tls_files

    write_keypair(tmp_path / "k.key", tmp_path / "coordinator.pub")
    tls = write_tls_files(tmp_path / "pki")
    write_node_auth_keypair(tmp_path / "n.key", tmp_path / "n.pub")
    for public in (tmp_path / "coordinator.pub", tls.ca_cert, tls.server_cert,
                   tmp_path / "n.pub"):
        assert stat.S_IMODE(os.stat(public).st_mode) == 0o644, public.name
    for secret in (tmp_path / "k.key", tls.ca_key, tls.server_key, tmp_path / "n.key"):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600, secret.name


def test_the_state_after_a_release_names_the_run(neighbours: Neighbours) -> None:
    """The per-run state the impute stage relies on: this run, this site, not yet used."""
    record = neighbours.released_state[0].config_records[STATE_RECORD]
    assert int(record["run_id"]) == RUN_ID and record["site_id"] == "hosp"
    assert record["imputed"] is False and record["epsilon"] == EPSILON


# -- Finding 8: any bank, a clean refusal or a completed imputation, alike for D and D + 1 ----

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
#: One edit of the other site's cells: (field, where as a fraction of its size, new value or
#: factor, whether the value multiplies).
edits = st.tuples(st.sampled_from(["lo", "hi", "gram", "sigma", "cell_gram"]),
                  st.floats(0.0, 1.0, exclude_max=True),
                  st.one_of(floats, st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 2.0])),
                  st.booleans())


@st.composite
def arrays_npz(draw: st.DrawFn) -> bytes:
    """An npz that looks like a bank: a manifest and arrays of the right or wrong shapes."""
    n_cells = draw(st.integers(0, 4))
    width = draw(st.sampled_from([len(COLUMNS), len(COLUMNS) + 1, 1]))

    def array(*shape: int) -> np.ndarray:
        values = draw(st.lists(floats, min_size=int(np.prod(shape)),
                               max_size=int(np.prod(shape))))
        return np.array(values, dtype=np.float64).reshape(shape)

    manifest = {"format": "fediim-bank/1", "n_features": draw(st.integers(-1, 5)),
                "n_cells": n_cells, "min_records": draw(st.integers(0, 12)), "meta": {}}
    buffer = io.BytesIO()
    np.savez(buffer, manifest=np.array(json.dumps(manifest)),
             site=np.array(draw(st.lists(st.sampled_from(["hosp", "other", ""]),
                                         min_size=n_cells, max_size=n_cells)), dtype=str),
             cell=np.array([f"c{i}" for i in range(n_cells)], dtype=str),
             lo=array(n_cells, width), hi=array(n_cells, width),
             gram=array(n_cells, width + 1, width + 1), sigma=array(n_cells),
             tree=np.zeros(n_cells, dtype=np.int64))
    return buffer.getvalue()


def _edited(cells: ModelBank, changes: list[tuple[str, float, float, bool]]) -> ModelBank:
    """``cells`` with each edit applied; ``cell_gram`` rescales one cell's whole Gram matrix
    (PSD, so it may pass vetting and reach the numerics)."""
    out = cells.select(np.ones(cells.n_cells, dtype=bool))
    for name, where, value, multiply in changes:
        target = out.gram[int(where * out.n_cells)] if name == "cell_gram" else getattr(out, name)
        flat = target.reshape(-1)
        index = slice(None) if name == "cell_gram" else int(where * flat.size)
        with np.errstate(all="ignore"):
            flat[index] = flat[index] * value if multiply else value
    return out


#: A change of another site's cells that keeps every Gram matrix PSD, so that the bank may
#: pass vetting and reach the numerics: (what, which cell as a fraction, a factor, i, j).
plausible = st.tuples(st.sampled_from(["scale", "copy_attribute", "decorrelate", "shrink_box"]),
                      st.floats(0.0, 1.0, exclude_max=True), st.floats(0.05, 20.0),
                      st.integers(1, len(COLUMNS)), st.integers(1, len(COLUMNS)))


def _plausible(cells: ModelBank, changes: list[tuple[str, float, float, int, int]]
               ) -> ModelBank:
    """``cells`` with PSD-preserving changes: a cell's Gram rescaled, one attribute made a
    copy of another, a cell's attributes decorrelated, a cell's box shrunk."""
    out = cells.select(np.ones(cells.n_cells, dtype=bool))
    for what, where, factor, i, j in changes:
        cell = int(where * out.n_cells)
        gram = out.gram[cell]
        if what == "scale":
            gram *= factor
        elif what == "copy_attribute":
            gram[j, :], gram[:, j] = gram[i, :].copy(), gram[:, i].copy()
        elif what == "decorrelate":
            out.gram[cell] = np.diag(np.diag(gram))
        else:
            middle = 0.5 * (out.lo[cell] + out.hi[cell])
            out.lo[cell] = middle + (out.lo[cell] - middle) / factor
            out.hi[cell] = middle + (out.hi[cell] - middle) / factor
    return out


@settings(max_examples=150, deadline=timedelta(seconds=20), derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(min_size=1, max_size=256).map(lambda data: ("bytes", data)),
                 arrays_npz().map(lambda data: ("bytes", data)),
                 st.lists(edits, min_size=1, max_size=3).map(lambda ch: ("cells", ch)),
                 st.lists(plausible, min_size=1, max_size=3).map(lambda ch: ("psd", ch))))
def test_any_bank_gives_a_clean_refusal_or_a_completed_imputation(
        neighbours: Neighbours, bank: tuple[str, Any]) -> None:
    """Finding 8: fuzzing the site's impute path with arbitrary banks (random bytes, bank-like
    arrays of any shape, NaN/inf, crafted cells of another site, degenerate but PSD cells):
    every reply is a refusal as a bad bank or a completed imputation, the same for D and
    D + one record."""
    kind, payload = bank
    crafted = {"cells": _edited, "psd": _plausible}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "bytes":
            first, second = neighbours.impute_both(bank_bytes=payload)
        else:
            first, second = neighbours.impute_both(crafted[kind](neighbours.other, payload))
    event(f"{kind}: {first.code}")
    assert first.code == second.code and first.code in ("ok", "bad_bank"), (first, second)
    assert _without_ledger(first) == _without_ledger(second)
    if first.ok:
        for site in neighbours.sites:
            assert not np.isnan(site.imputed()).any()


def test_replies_leave_at_multiples_of_the_reply_time_quantum(
        tmp_path: Path, fake_reply_clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 8: a release's time grows with the site's records, and the coordinator can
    time it. Each reply now leaves at a whole multiple of the site's quantum (2 s by
    default) after its request arrived, whatever the work took within it."""
    from fediim.protocol.clock import sleep_to_quantum

    clock = FakeClock()
    for work, expected in [(0.0, 2.0), (0.3, 2.0), (1.99, 2.0), (2.5, 4.0), (7.0, 8.0)]:
        started = clock.now
        clock.now += work
        assert sleep_to_quantum(clock, started, 2.0) == pytest.approx(expected)
        assert clock.now - started == pytest.approx(expected)
    assert sleep_to_quantum(clock, clock.now - 0.7, 0.0) == pytest.approx(0.7)

    coordinator = Coordinator(tmp_path / "coordinator")
    for n_rows in (60, 600):  # ten times the records: the same reply time
        site = make_site(tmp_path / f"site{n_rows}", coordinator, _table(n_rows, n_rows))
        for request in (HandshakeRequest, ReleaseRequest):
            before = fake_reply_clock.now
            record = site.send(coordinator.privacy(request, epsilon=1.0, delta=1e-6))
            assert record.config_records[CONFIG_RECORD]["code"] == "ok"
            assert fake_reply_clock.now - before == pytest.approx(2.0)
