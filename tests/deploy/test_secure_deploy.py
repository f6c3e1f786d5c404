"""Done-when 2 of issue 14 in a real TLS ``local-deploy`` (benchmarks/secure_deploy.py):
4 sites x 1,000 ccpp rows with secure aggregation, one SuperNode SIGKILLed as soon as
``federation.json`` records the share-keys round; the run completes with the other three.
Slow (a real deployment of 8 rounds, ~3 min here): ``pytest -m slow``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from fediim.deploy.supervisor import stray_processes
from tests.paths import DATASETS, REPO, require_file

pytestmark = pytest.mark.slow


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location(
        "secure_deploy_bench", REPO / "benchmarks" / "secure_deploy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "secure_deploy_bench", module)
    spec.loader.exec_module(module)
    return module


def test_a_supernode_killed_after_key_sharing_leaves_three_to_finish(
        bench: Any, tmp_path: Path) -> None:
    require_file(DATASETS / "ccpp.csv")
    data, schema = bench.prepare_sites(tmp_path / "data", DATASETS / "ccpp.csv")
    run = bench.deploy(data, schema, tmp_path / "fed", "secure", kill="sited",
                       **{"release-timeout": bench.KILL_RELEASE_TIMEOUT})
    assert run["killed_pids"], "the SuperNode was never killed"
    assert run["status"] == "completed", run["error"]
    assert run["imputed"] == ["sitea", "siteb", "sitec"]
    rounds = {r["round"]: r["survivors"] for r in run["secure"]["rounds"]}
    assert "sited" in rounds["share_keys"]
    assert rounds["grams:unmask"] == ["sitea", "siteb", "sitec"]
    # its histograms input rode with key sharing; it is dropped from the counts on
    assert [s["dropped"] for s in run["secure"]["sessions"]] == [[], ["sited"], []]
    assert [d["site_id"] for d in run["dropped"]] == ["sited"]
    assert run["bank_cells"] > 0
    assert stray_processes(run["marker"]) == []
