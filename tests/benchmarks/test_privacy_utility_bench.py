"""The privacy-utility benchmark: a thin runner over studies, and its committed numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations import run_study
from tests.paths import DATASETS, REPO, benchmark_script, require_file

BENCH = REPO / "benchmarks"
COMMITTED = BENCH / "results" / "privacy_utility.json"

@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    return benchmark_script(monkeypatch, "privacy_utility.py", "privacy_utility_bench")


def test_gathers_the_studies_into_one_results_file(bench: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res" / "pu.json"
    argv = ["--studies", "diabetes", "--work", str(tmp_path / "work"), "--out", str(out),
            "--workers", "1", "--seeds", "0,1", "--eps", "1",
            "--methods", "local,federated,hybrid"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "privacy_utility" and doc["machine"]["code_fingerprint"]
    assert doc["studies"]["diabetes"]["cells"]["total"] == 2 * (1 + 2)  # narrowed
    assert {(r["method"], r["epsilon"]) for r in doc["records"]} == {
        ("local", None), ("federated", "1"), ("hybrid", "1")}
    assert doc["summary"]["diabetes"]["hybrid"]["1"]["n_seeds"] == 2
    assert doc["paired_vs_local"]["diabetes"]["hybrid"]["1"]["n_seeds"] == 2
    assert "| diabetes | hybrid |  |" in printed and "| diabetes | federated | +" in printed
    # the smallest hospital on its own (D: 10% of the patients)
    assert doc["small_site"]["diabetes"]["site"] == "D"
    assert "#### diabetes: site `D` (44 of 442 rows" in printed
    assert "| hybrid − min(local, federated) | " in printed
    assert (out.parent / "pu_small_site.png").read_bytes()[:4] == b"\x89PNG"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "work" / "diabetes" / "report.md").is_file()
    # a rerun is all cache
    assert bench.main(argv) == 0
    assert json.loads(out.read_text())["studies"]["diabetes"]["cells"]["computed"] == 0


def test_the_default_benchmark_includes_the_size_skewed_scenarios(bench: Any) -> None:
    assert bench.parse_args([]).studies == ["heart", "ccpp", "wine", "ccpp_skewed"]


def test_committed_results_are_what_the_code_computes(bench: Any, tmp_path: Path) -> None:
    """Heart, seed 0, ε = 1: the committed per-seed records come out again."""
    require_file(DATASETS)
    args = bench.parse_args(["--studies", "heart", "--seeds", "0", "--eps", "1", "--methods",
                             "local,centralized,federated,hybrid,federated_mean"])
    (study,) = bench.load_studies(args)
    run = run_study(study, tmp_path, workers=1, progress=False, write=False)
    committed = {(r["dataset"], r["seed"], r["method"], r["epsilon"]): r
                 for r in json.loads(COMMITTED.read_text())["records"]}
    assert len(run.records) == 5
    for rec in run.records:
        want = committed[(rec["dataset"], rec["seed"], rec["method"], rec["epsilon"])]
        assert rec["nrmse"] == pytest.approx(want["nrmse"], rel=1e-9), rec["method"]
        assert rec["nrmse_site"] == pytest.approx(want["nrmse_site"], rel=1e-9)
