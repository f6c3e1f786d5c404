"""Done-when 2 of issue 14 in a real TLS ``local-deploy`` (benchmarks/secure_deploy.py):
4 sites x 1,000 ccpp rows with secure aggregation, one SuperNode SIGKILLed as soon as
``federation.json`` records the share-keys round; the run completes with the other three.
Slow (a real deployment of 8 rounds, ~3 min here): ``pytest -m slow``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fediim.deploy.supervisor import stray_processes
from tests.paths import DATASETS, benchmark_script, require_file

pytestmark = pytest.mark.slow


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    return benchmark_script(monkeypatch, "secure_deploy.py", "secure_deploy_bench")


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
    # its moments input rode with key sharing; it is dropped from the counts on
    assert [s["dropped"] for s in run["secure"]["sessions"]] == [[], ["sited"], []]
    assert [d["site_id"] for d in run["dropped"]] == ["sited"]
    assert run["bank_cells"] > 0
    assert stray_processes(run["marker"]) == []
