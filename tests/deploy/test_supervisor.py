"""The supervisor's rules, without Flower (stand-in processes, seconds): a SuperNode that
exits is a site that dropped out, the SuperLink exiting is a failure, and a failure or
SIGTERM stops everything; the command line passes stage timeouts through ``--run-config``."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fediim.cli.deploy
from fediim.cli import main
from fediim.deploy.layout import prepare_federation
from fediim.deploy.local import _sigterm_as_interrupt
from fediim.deploy.supervisor import LocalDeployment, stray_processes, supernode_name
from fediim.errors import DeployError
from fediim.io.schema import TableSchema

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _schema(tmp_path: Path) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(TableSchema.model_validate(
        {"columns": [{"name": "x", "bounds": (0.0, 1.0)}]}).to_toml())
    return path


def test_a_supernode_exit_is_a_dropout_a_superlink_exit_a_failure(tmp_path: Path) -> None:
    """Finding 13: a SuperNode that exits no longer aborts the deployment; it is recorded
    once as a dropped site (id, exit code, time). The SuperLink exiting still is a
    DeployError naming it, and on the way out every process is stopped and the temporary
    FLWR_HOME (0700, where the CA and node keys live) is removed."""
    layout = prepare_federation([tmp_path / "a.csv", tmp_path / "b.csv"], _schema(tmp_path),
                                tmp_path / "out")
    deployment = LocalDeployment(layout)
    assert stat.S_IMODE(deployment.home.stat().st_mode) == 0o700  # keys go in there
    with pytest.raises(DeployError, match="superlink exited with code -9"), deployment:
        superlink = deployment.start_process("superlink", SLEEPER)
        node_a = deployment.start_process(supernode_name("a"), SLEEPER)
        deployment.start_process(supernode_name("b"), SLEEPER)
        deployment.watch()
        assert deployment.dropped == []
        os.kill(node_a.pid, signal.SIGKILL)
        node_a.wait(timeout=10)
        deployment.watch()
        deployment.watch()  # noted once
        [dropped] = deployment.dropped
        assert (dropped.site_id, dropped.exit_code) == ("a", -signal.SIGKILL)
        assert dropped.seconds_into_run is None  # before any run was submitted
        assert dropped.log.endswith("supernode-a.log") and dropped.detected_at
        os.kill(superlink.pid, signal.SIGKILL)
        superlink.wait(timeout=10)
        deployment.watch()
    # the failure stopped everything (node b was still up) and removed FLWR_HOME
    assert stray_processes(deployment.marker) == []
    assert not deployment.home.exists()


def test_sigterm_stops_every_process_and_removes_flwr_home(tmp_path: Path) -> None:
    """SIGTERM to ``fediim local-deploy`` ends the deployment as Ctrl-C does: every process
    it started is stopped and the temporary FLWR_HOME (the keys) removed."""
    layout = prepare_federation([tmp_path / "a.csv"], _schema(tmp_path), tmp_path / "out")
    deployment = LocalDeployment(layout)
    with pytest.raises(KeyboardInterrupt), _sigterm_as_interrupt(), deployment:
        deployment.start_process("superlink", SLEEPER)
        deployment.start_process(supernode_name("a"), SLEEPER)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted at once by the signal
    assert stray_processes(deployment.marker) == []
    assert not deployment.home.exists()

def test_run_config_option_sets_stage_timeouts(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The timeouts a dead site can hold a run for are settable from the command line (the
    deployment test needs it); keys with an option of their own are refused."""
    seen: dict[str, Any] = {}

    def _record(*args: object, run_config: dict[str, Any], **kwargs: object) -> None:
        seen.update(run_config)
        raise DeployError("stop here")

    monkeypatch.setattr(fediim.cli.deploy, "local_deploy", _record)
    data = tmp_path / "a.csv"
    data.write_text("x\n1\n")
    base = ["local-deploy", "--data", str(data), "--schema", "s", "--out", str(tmp_path / "o")]
    assert main([*base, "--run-config", "handshake-timeout=30",
                 "--run-config", "release-timeout = 45.5"]) == 1
    assert seen["handshake-timeout"] == 30.0 and seen["release-timeout"] == 45.5
    for bad, says in (("epsilon=3", "KEY one of"), ("impute-timeout=0", "greater than 0"),
                      ("impute-timeout", "KEY=VALUE")):
        assert main([*base, "--run-config", bad]) == 2
        assert says in capsys.readouterr().err
