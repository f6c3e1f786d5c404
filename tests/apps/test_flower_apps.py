"""The real ServerApp and ClientApps in one process (tests/flower_grid.py): the happy path,
equality with the in-process FederatedIIM, and every failure behaviour of the federation.

The coordinator waits on a :class:`FakeClock`: a silent site is excluded after its full
(default) stage timeout, and the test does not wait for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from coordinator.app import make_server_app
from fediim.deploy.layout import FederationLayout, prepare_federation
from fediim.errors import ExitCode, QuorumNotMet
from fediim.federated import FederatedIIM
from fediim.federated.bank import ModelBank
from fediim.io.schema import TableSchema
from fediim.io.table import read_csv, write_csv
from fediim.privacy import PrivacyLedger, epsilon_to_rho
from fediim.protocol.messages import ARRAYS_RECORD, REPLY_REASONS, ReplyCode
from fediim.protocol.run_config import RUN_CONFIG_DEFAULTS
from fediim.protocol.signing import read_signature_file, verify_bank, write_keypair
from fediim.protocol.site_config import load_site_config
from site_client.app import app as client_app
from tests.fake_clock import FakeClock
from tests.flower_grid import InProcessGrid, run_server_app

COLUMNS = ["age", "bp", "chol", "hr"]
BOUNDS = [(0.0, 120.0), (40.0, 250.0), (50.0, 700.0), (30.0, 220.0)]
RUN_ID = 4242


def _table(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    x = np.column_stack([
        55 + 9 * z + rng.normal(0, 3, n),
        130 + 12 * z + rng.normal(0, 5, n),
        240 + 35 * z + rng.normal(0, 15, n),
        140 - 15 * z + rng.normal(0, 6, n),
    ])
    miss = rng.random(x.shape) < 0.1
    miss[miss.all(axis=1), 0] = False
    x[miss] = np.nan
    return x


def _write_csv(path: Path, x: np.ndarray) -> None:
    write_csv(path, x, COLUMNS, float_format=None)  # exact values, NaN as empty


def _schema(path: Path, bounds: list[tuple[float, float]] = BOUNDS) -> Path:
    schema = TableSchema.model_validate(
        {"columns": [{"name": c, "bounds": b} for c, b in zip(COLUMNS, bounds, strict=True)]})
    path.write_text(schema.to_toml(), encoding="utf-8")
    return path


def _federation(tmp_path: Path, sizes: tuple[int, ...] = (160, 120, 100), *,
                epsilon: float = 4.0, min_sites: int = 2, seed: int = -1,
                budget_epsilon: float | None = None, **run: Any) -> FederationLayout:
    data = []
    for i, n in enumerate(sizes):
        p = tmp_path / "data" / f"site{chr(ord('a') + i)}.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(p, _table(i, n))
        data.append(p)
    schema = _schema(tmp_path / "schema.toml")
    return prepare_federation(
        data, schema, tmp_path / "out", epsilon=epsilon, delta=1e-6, min_sites=min_sites,
        budget_epsilon=budget_epsilon, insecure_seeded_noise=seed >= 0,
        # the default timeouts: waiting them out costs only FakeClock time
        run_config={"seed": seed, "aggregation": "per-site", **run})


def _serve(grid: InProcessGrid, clock: FakeClock | None = None) -> FakeClock:
    """Run the real ServerApp against ``grid``, waiting on ``clock`` (a fresh FakeClock by
    default); return the clock."""
    clock = clock or FakeClock()
    run_server_app(make_server_app(clock), grid)
    return clock


def _run(layout: FederationLayout, clock: FakeClock | None = None,
         **grid_kwargs: Any) -> InProcessGrid:
    nodes = {101 + i: {"site-config": str(s.config)} for i, s in enumerate(layout.sites)}
    run_config = {**RUN_CONFIG_DEFAULTS, **layout.run_config}
    grid = InProcessGrid(client_app, nodes, run_id=RUN_ID, run_config=run_config, **grid_kwargs)
    _serve(grid, clock)
    return grid


def _view(layout: FederationLayout) -> dict[str, Any]:
    return json.loads((layout.coordinator_dir / "federation.json").read_text())


def _ledger_bytes(layout: FederationLayout) -> dict[str, bytes | None]:
    return {s.site_id: s.ledger.read_bytes() if s.ledger.exists() else None
            for s in layout.sites}


def test_happy_path_writes_outputs_ledgers_and_federation_view(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=(300, 200, 150))
    clock = FakeClock()
    grid = _run(layout, clock)
    assert clock.now == 0.0  # every node connected and every reply at the first pull
    assert [g for _, g in grid.delivered] == ["handshake"] * 3 + ["release"] * 3 + ["impute"] * 3
    view = _view(layout)
    assert view["status"] == "completed" and view["error"] is None
    rho = view["request"]["rho_per_site"]
    assert rho == pytest.approx(epsilon_to_rho(4.0, 1e-6))
    for site in layout.sites:
        entry = view["sites"][site.site_id]
        assert entry["active"] and entry["stages"]["impute"]["code"] == "ok"
        ledger = PrivacyLedger.open(site.ledger, epsilon_to_rho(4.0, 1e-6), site.site_id)
        # the tree may stop early and spend less than planned, never more
        assert 0.5 * rho < ledger.spent_rho <= rho * (1 + 1e-9)
        assert entry["rho_spent_this_run"] == pytest.approx(ledger.spent_rho, rel=1e-12)
        assert entry["ledger"]["rho_spent"] == pytest.approx(ledger.spent_rho, rel=1e-12)
        src = read_csv(site.data)
        out = read_csv(site.directory / "imputed.csv")
        assert out.columns == src.columns
        obs = ~np.isnan(src.values)
        np.testing.assert_array_equal(out.values[obs], src.values[obs])
        assert not np.isnan(out.values).any()
        n_missing = int(np.isnan(src.values).sum())
        assert entry["stages"]["impute"] == {"code": "ok", "reason": ""}  # a status, no counts
        lines = (site.directory / "audit.jsonl").read_text().splitlines()
        assert len(lines) == n_missing
        flags = (site.directory / "flags.csv").read_text().splitlines()
        assert len(flags) == src.n_rows + 1
        for lo_hi, j in zip(BOUNDS, range(len(COLUMNS)), strict=True):
            assert lo_hi[0] <= out.values[:, j].min() and out.values[:, j].max() <= lo_hi[1]
    # The bank each site saved is the one the coordinator signed, and it verifies.
    bank_bytes = (layout.coordinator_dir / "bank.npz").read_bytes()
    sig = read_signature_file(layout.coordinator_dir / "bank.sig.json")
    for site in layout.sites:
        assert (site.directory / "bank.npz").read_bytes() == bank_bytes
    from fediim.protocol.signing import load_public_key

    verify_bank(load_public_key(layout.public_key), sig["signature"], bank_bytes,
                sig["schema_hash"], RUN_ID)
    assert view["bank"]["n_cells"] == ModelBank.from_bytes(bank_bytes).n_cells > 0


def test_flower_path_and_in_process_federated_iim_give_the_same_bank(tmp_path: Path) -> None:
    layout = _federation(tmp_path, seed=1234)
    _run(layout)
    flower_bank = (layout.coordinator_dir / "bank.npz").read_bytes()
    schema_bounds = np.array(BOUNDS)
    sites = sorted(layout.sites, key=lambda s: s.site_id)
    fed = FederatedIIM(epsilon=4.0, delta=1e-6, bounds=schema_bounds, seed=1234,
                       aggregation="per-site").fit(
        [read_csv(s.data).values for s in sites], site_ids=[s.site_id for s in sites])
    got = ModelBank.from_bytes(flower_bank)
    want = fed.bank_
    # exactly the same cells (npz bytes themselves carry zip timestamps)
    assert got.n_cells == want.n_cells > 0
    for name in ("site", "cell", "lo", "hi", "gram", "sigma"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert (got.n_features, got.min_records, got.meta) == (
        want.n_features, want.min_records, want.meta)
    # and the ledgers charged the same spend, release by release
    for s, mem in zip(sites, fed.ledgers_, strict=True):
        disk = PrivacyLedger.open(s.ledger, epsilon_to_rho(4.0, 1e-6), s.site_id)
        assert [e.rho for e in disk.entries] == pytest.approx([e.rho for e in mem.entries])
        assert all("seeded" in e.noise_source for e in disk.entries)
    # the sites' imputations equal FederatedIIM's, too
    for s, res in zip(sites, fed.impute([read_csv(s.data).values for s in sites]), strict=True):
        out = read_csv(s.directory / "imputed.csv").values
        np.testing.assert_allclose(out, np.clip(res.values, schema_bounds[:, 0],
                                                schema_bounds[:, 1]), rtol=1e-12)


def test_default_noise_is_opendp(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=(200, 200), min_sites=2)
    _run(layout)
    site = layout.sites[0]
    entries = PrivacyLedger.open(site.ledger, epsilon_to_rho(4.0, 1e-6), site.site_id).entries
    assert entries and all(e.noise_source == "gaussian-opendp-exact" for e in entries)


def test_seeded_noise_is_refused_unless_the_site_allows_it(tmp_path: Path) -> None:
    layout = _federation(tmp_path, min_sites=1)
    run_config = {**layout.run_config, "seed": 7}
    layout = FederationLayout(**{**layout.__dict__, "run_config": run_config})
    before = _ledger_bytes(layout)
    with pytest.raises(QuorumNotMet, match="seeded_noise_refused"):
        _run(layout)
    assert _ledger_bytes(layout) == before


def test_schema_mismatch_at_one_site_is_refused_and_the_others_proceed(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    odd = layout.sites[1]
    other_schema = _schema(tmp_path / "other-schema.toml",
                           [(0.0, 100.0), *BOUNDS[1:]])
    text = odd.config.read_text().replace(str(layout.schema), str(other_schema))
    odd.config.write_text(text)
    grid = _run(layout)
    view = _view(layout)
    assert view["status"] == "completed"
    hs = view["sites"][odd.site_id]["stages"]["handshake"]
    assert hs["code"] == "schema_mismatch" and "schema mismatch" in hs["reason"]
    assert not view["sites"][odd.site_id]["active"]
    assert (odd.directory / "imputed.csv").exists() is False
    assert ("release" not in {g for n, g in grid.delivered if n == 102})
    for s in (layout.sites[0], layout.sites[2]):
        assert view["sites"][s.site_id]["stages"]["impute"]["code"] == "ok"
        assert (s.directory / "imputed.csv").exists()


def test_insufficient_budget_site_declines_and_its_ledger_is_unchanged(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    poor = layout.sites[0]
    cfg = load_site_config(poor.config)
    text = poor.config.read_text().replace(f"epsilon = {cfg.budget.epsilon!r}", "epsilon = 1.0")
    poor.config.write_text(text)
    poor.ledger.unlink()  # prepare_federation created it with the old budget
    PrivacyLedger.create(poor.ledger, epsilon_to_rho(1.0, 1e-6), poor.site_id)
    before = poor.ledger.read_bytes()
    _run(layout)
    view = _view(layout)
    hs = view["sites"][poor.site_id]["stages"]["handshake"]
    assert hs["code"] == "insufficient_budget" and "insufficient privacy budget" in hs["reason"]
    assert view["sites"][poor.site_id]["ledger"]["rho_spent"] == 0.0
    assert poor.ledger.read_bytes() == before
    assert view["status"] == "completed"


def test_a_second_run_is_refused_once_the_budget_is_spent(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=(200, 200))
    _run(layout)
    before = _ledger_bytes(layout)
    with pytest.raises(QuorumNotMet, match="insufficient_budget"):
        _run(layout)
    assert _ledger_bytes(layout) == before


def test_silent_site_is_excluded(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    clock = FakeClock()
    grid = _run(layout, clock, drop=lambda node, stage: node == 103 and stage == "handshake")
    timeout = RUN_CONFIG_DEFAULTS["handshake-timeout"]
    assert clock.now == timeout  # the coordinator waited out the whole handshake timeout
    view = _view(layout)
    silent = view["sites"]["node-103"]
    assert silent["stages"]["handshake"]["code"] == "silent"
    assert silent["stages"]["handshake"]["reason"] == (
        f"no reply within the handshake timeout ({timeout:g} s)")
    assert {n for n, g in grid.delivered if g == "release"} == {101, 102}
    assert view["status"] == "completed"


def test_site_silent_at_release_is_excluded_from_the_bank(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    clock = FakeClock()
    _run(layout, clock, drop=lambda node, stage: node == 101 and stage == "release")
    assert clock.now == RUN_CONFIG_DEFAULTS["release-timeout"]
    view = _view(layout)
    sid = layout.sites[0].site_id
    assert view["sites"][sid]["stages"]["release"]["code"] == "silent"
    assert sid not in view["bank"]["sites"]
    assert view["status"] == "completed"


def _corrupt_signature(node: int, stage: str, content: RecordDict) -> RecordDict:
    if stage == "impute" and node == 102:
        sig = bytearray(content.array_records[ARRAYS_RECORD]["signature"].numpy().tobytes())
        sig[0] ^= 0xFF
        content.array_records[ARRAYS_RECORD]["signature"] = Array(
            np.frombuffer(bytes(sig), dtype=np.uint8).copy())
    return content


def test_bad_signature_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    _run(layout, tamper=_corrupt_signature)
    view = _view(layout)
    site = layout.sites[1]
    st = view["sites"][site.site_id]["stages"]["impute"]
    assert st["code"] == "bad_signature" and "signature" in st["reason"]
    assert sorted(p.name for p in site.directory.iterdir()) == [
        "ledger.json", "site.key", "site.pub", "site.toml"]
    assert view["status"] == "completed"  # the two others still make quorum


def _swap_bank(node: int, stage: str, content: RecordDict) -> RecordDict:
    """A bank altered in transit (one Gram entry), signature left as is."""
    if stage == "impute":
        arrays = content.array_records[ARRAYS_RECORD]
        bank = ModelBank.from_bytes(arrays["bank"].numpy().tobytes())
        bank.gram[0, 0, 0] += 1.0
        content.array_records[ARRAYS_RECORD] = ArrayRecord({
            "bank": Array(np.frombuffer(bank.to_bytes(), dtype=np.uint8).copy()),
            "signature": arrays["signature"]})
    return content


def test_tampered_bank_fails_signature_at_every_site_and_the_run_fails(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    with pytest.raises(QuorumNotMet, match="bad_signature"):
        _run(layout, tamper=_swap_bank)
    for s in layout.sites:
        assert not (s.directory / "imputed.csv").exists()
    assert _view(layout)["status"] == "failed"


def test_wrong_coordinator_key_is_refused_at_handshake(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    other = tmp_path / "other.pub"
    write_keypair(tmp_path / "other.key", other)
    s = layout.sites[2]
    s.config.write_text(s.config.read_text().replace(str(layout.public_key), str(other)))
    _run(layout)
    st = _view(layout)["sites"][s.site_id]["stages"]["handshake"]
    assert st["code"] == "key_mismatch"


def test_bad_data_file_is_refused_with_a_fixed_reason(tmp_path: Path) -> None:
    """Finding 8 (review): the refusal names neither the cell's value, nor its line or column;
    the site's log has the details."""
    layout = _federation(tmp_path)
    bad = layout.sites[0]
    lines = bad.data.read_text().splitlines()
    fields = lines[5].split(",")
    fields[2] = "Smith"
    lines[5] = ",".join(fields)
    bad.data.write_text("\n".join(lines) + "\n")
    _run(layout)
    st = _view(layout)["sites"][bad.site_id]["stages"]["handshake"]
    assert st["code"] == "bad_data" and st["reason"] == REPLY_REASONS[ReplyCode.BAD_DATA]
    assert "line" not in st["reason"] and "chol" not in st["reason"]


def test_missing_site_config_is_a_clear_refusal(tmp_path: Path) -> None:
    layout = _federation(tmp_path)
    layout.sites[0].config.unlink()
    _run(layout)
    st = _view(layout)["sites"]["node-101"]["stages"]["handshake"]
    assert st["code"] == "bad_config" and st["reason"] == REPLY_REASONS[ReplyCode.BAD_CONFIG]


def test_quorum_not_met_fails_the_run_before_anything_is_spent(tmp_path: Path) -> None:
    layout = _federation(tmp_path, min_sites=3)
    with pytest.raises(QuorumNotMet, match="quorum not met after handshake: 2 site"):
        _run(layout, drop=lambda node, stage: node == 101)
    for s in layout.sites:  # prepare_federation created the ledgers; nothing was charged
        assert PrivacyLedger.open(s.ledger, epsilon_to_rho(4.0, 1e-6), s.site_id).entries == ()
    view = _view(layout)
    assert view["status"] == "failed" and "quorum not met" in view["error"]


def test_too_few_nodes_connected_fails(tmp_path: Path) -> None:
    layout = _federation(tmp_path, sizes=(200,), min_sites=2)
    clock = FakeClock()
    with pytest.raises(QuorumNotMet, match="1 site"):
        _run(layout, clock)
    # the coordinator waited node-wait-timeout for the second SuperNode
    assert clock.now == RUN_CONFIG_DEFAULTS["node-wait-timeout"]


def test_simulation_nodes_find_their_site_by_partition_id(tmp_path: Path) -> None:
    """The Simulation Engine gives nodes only partition-id/num-partitions: the ClientApp then
    reads its site TOML from the run config's ``site-configs`` list."""
    layout = _federation(tmp_path, sizes=(200, 150))
    n = len(layout.sites)
    nodes = {7 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}
    run_config = {**RUN_CONFIG_DEFAULTS, **layout.run_config,
                  "site-configs": json.dumps([str(s.config) for s in layout.sites])}
    grid = InProcessGrid(client_app, nodes, run_id=RUN_ID, run_config=run_config)
    _serve(grid)
    view = _view(layout)
    assert view["status"] == "completed"
    assert sorted(view["sites"]) == sorted(s.site_id for s in layout.sites)
    for s in layout.sites:
        assert (s.directory / "imputed.csv").exists()


def test_a_deployed_node_without_site_config_ignores_site_configs(tmp_path: Path) -> None:
    from site_client.site import site_config_path

    rc = {"site-configs": json.dumps(["/a.toml", "/b.toml"])}
    assert site_config_path({"site-config": "/own.toml", "partition-id": 1}, rc) == "/own.toml"
    assert site_config_path({}, rc) is None
    assert site_config_path({"partition-id": 1}, rc) == "/b.toml"
    assert site_config_path({"partition-id": 5}, rc) is None


def test_simulate_without_ray_is_a_clear_usage_error(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether or not Ray is installed here: the lookup is made to find none."""
    import fediim.deploy.local
    from fediim.cli import main

    monkeypatch.setattr(fediim.deploy.local, "simulation_engine_available", lambda: False)
    layout = _federation(tmp_path / "x", sizes=(50,))
    code = main(["simulate", "--data", str(layout.sites[0].data), "--schema",
                 str(layout.schema), "--out", str(tmp_path / "sim")])
    assert code == ExitCode.USAGE and "needs Ray" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()


def test_a_crashing_client_app_is_excluded_with_its_error(tmp_path: Path) -> None:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    crashing = ClientApp()

    @crashing.query()
    def _query(msg: Message, context: Context) -> Message:
        if context.node_id == 102:
            raise RuntimeError("disk on fire")
        return client_app(msg, context)

    layout = _federation(tmp_path)
    nodes = {101 + i: {"site-config": str(s.config)} for i, s in enumerate(layout.sites)}
    grid = InProcessGrid(crashing, nodes, run_id=RUN_ID,
                         run_config={**RUN_CONFIG_DEFAULTS, **layout.run_config})
    _serve(grid)
    st = _view(layout)["sites"]["node-102"]["stages"]["handshake"]
    assert st["code"] == "error" and "disk on fire" in st["reason"]

