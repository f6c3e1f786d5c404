"""``fediim local-deploy``'s shorter Flower polls: the SuperNode's idle and reply sleeps
(applied only to the Flower source read for it) and the SuperExec's task poll."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supernode import start_client_internal

from fediim.deploy import supernode
from fediim.deploy.layout import prepare_federation
from fediim.deploy.supervisor import (
    SUPEREXEC_POLL_ENV,
    SUPEREXEC_POLL_SECONDS,
    SUPERNODE_MODULE,
    LocalDeployment,
    kill_supernode,
)
from fediim.io.schema import TableSchema


def test_the_known_source_is_the_installed_one_with_the_sleeps_it_shortens() -> None:
    """The digest names the installed Flower's SuperNode loop, and that file has exactly the
    sleeps the clock replaces: 3 s after an empty pull, 0.5 s while waiting for a reply."""
    source = Path(start_client_internal.__file__).read_text(encoding="utf-8")
    assert supernode.source_digest(start_client_internal) in supernode.KNOWN_SOURCES
    assert source.count("time.sleep(3)") == 1 and source.count("time.sleep(0.5)") == 2
    assert source.count("time.sleep(") == 3  # no other sleep the clock would pass through


def test_shorten_polls_replaces_only_the_two_poll_sleeps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    assert supernode.shorten_polls() is True
    clock = start_client_internal.time
    assert isinstance(clock, supernode.ShortPollClock)
    assert supernode.shorten_polls() is True and start_client_internal.time is clock
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    for seconds in (3, 0.5, 2, 0.25):
        clock.sleep(seconds)
    assert slept == [supernode.IDLE_PULL_SECONDS, supernode.REPLY_POLL_SECONDS, 2, 0.25]
    assert supernode.IDLE_PULL_SECONDS < 3 and supernode.REPLY_POLL_SECONDS < 0.5
    assert clock.monotonic is time.monotonic and clock.time is time.time


def test_another_flower_source_is_left_as_flower_ships_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A SuperNode loop this project has not read (here: one changed byte) keeps its own
    sleeps, with a warning naming the source's digest."""
    original = Path(start_client_internal.__file__).read_text(encoding="utf-8")
    changed = tmp_path / "start_client_internal.py"
    changed.write_text(original.replace("time.sleep(3)", "time.sleep(4)"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("changed_flower_loop", changed)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with caplog.at_level(logging.WARNING, logger="fediim.deploy"):
        assert supernode.shorten_polls(module) is False
    assert module.time is time
    assert supernode.source_digest(module) in caplog.text
    assert "polls as Flower ships it" in caplog.text


def test_the_superexec_reads_the_poll_interval_local_deploy_sets(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.superexec.run_superexec import _get_task_poll_interval

    monkeypatch.setenv(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
    assert _get_task_poll_interval() == float(SUPEREXEC_POLL_SECONDS) < 1.0


@pytest.mark.parametrize("short_polls", [True, False])
def test_local_deploy_starts_supernodes_through_the_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_polls: bool) -> None:
    """With ``short_polls`` (the default) every SuperNode is this module and every process
    gets the SuperExec poll interval; without, Flower's command and polls."""
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    schema = tmp_path / "schema.toml"
    schema.write_text(TableSchema.model_validate(
        {"columns": [{"name": "x", "bounds": (0.0, 1.0)}]}).to_toml())
    layout = prepare_federation([tmp_path / "a.csv", tmp_path / "b.csv"], schema,
                                tmp_path / "out")
    started: list[tuple[str, list[str], dict[str, str]]] = []
    with LocalDeployment(layout, short_polls=short_polls) as deployment:
        monkeypatch.setattr(deployment, "start_process",
                            lambda name, args, env=None: started.append((name, args, env)))
        deployment._start_supernodes([1, 2])
    assert [name for name, _, _ in started] == ["supernode-a", "supernode-b"]
    for _, args, env in started:
        if short_polls:
            assert args[:3] == [sys.executable, "-m", SUPERNODE_MODULE]
            assert env[SUPEREXEC_POLL_ENV] == SUPEREXEC_POLL_SECONDS
        else:
            assert args[0].endswith("flower-supernode") and SUPEREXEC_POLL_ENV not in env
        assert "--superlink" in args and "--root-certificates" in args


def test_fediim_simulate_keeps_flowers_polls(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    schema = tmp_path / "schema.toml"
    schema.write_text(TableSchema.model_validate(
        {"columns": [{"name": "x", "bounds": (0.0, 1.0)}]}).to_toml())
    layout = prepare_federation([tmp_path / "a.csv"], schema, tmp_path / "out")
    with LocalDeployment(layout, simulation=True) as deployment:
        assert not deployment.short_polls and SUPEREXEC_POLL_ENV not in deployment.env


def test_kill_supernode_finds_a_supernode_started_through_the_module(tmp_path: Path) -> None:
    config = str(tmp_path / "site.toml")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "-m", SUPERNODE_MODULE, "--node-config",
                                f"site-config={config!r}"])
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        deadline = time.monotonic() + 10
        while SUPERNODE_MODULE.encode() not in cmdline.read_bytes():  # filled in after exec
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert kill_supernode(config) == [process.pid]
        assert process.wait(timeout=10) == -9
    finally:
        if process.poll() is None:
            os.kill(process.pid, 9)
