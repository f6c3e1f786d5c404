"""Supervision of a local federation's processes: SuperLink, SuperNodes, the run.

:class:`ProcessGroup` starts named processes, each logging to its own file, and stops them
all, including descendants that left their process group. :class:`LocalDeployment` prepares
a temporary ``FLWR_HOME`` (TLS material, node keys, the ``flwr`` connection), starts the
SuperLink and the SuperNodes, submits the run and follows it until it is finished.

Dropout is not failure: a SuperNode that exits is a site that dropped out (recorded as a
:class:`DroppedSite`, the run goes on, and the coordinator's quorum decides whether it can
finish without that site); the SuperLink exiting ends the deployment with a
:class:`DeployError`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Container
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fediim.deploy.layout import APP_DIR_NAME, FederationLayout, app_pyproject
from fediim.errors import DeployError

__all__ = ["CONNECTION", "DEFAULT_RUN_TIMEOUT", "MARKER_ENV", "DroppedSite", "LocalDeployment",
           "ProcessGroup", "free_ports", "kill_supernode", "stray_processes",
           "supernode_name"]

#: The ``flwr`` connection (``[superlink.local-deploy]``) in the temporary ``FLWR_HOME``.
CONNECTION = "local-deploy"
#: Environment variable carrying a deployment's marker into every process it starts.
MARKER_ENV = "FEDIIM_DEPLOY_ID"
#: Seconds after which a run that has not finished is stopped and reported as failed.
DEFAULT_RUN_TIMEOUT = 600.0
#: Seconds between looks at a starting SuperLink or leftover processes, at a running
#: submission, and at the run's status.
_SHORT_POLL, _STREAM_POLL, _STATUS_POLL = 0.25, 0.5, 2.0
#: The module that starts a SuperNode with shorter idle polls (:mod:`fediim.deploy.supernode`).
SUPERNODE_MODULE = "fediim.deploy.supernode"
#: Flower's SuperExec (which starts a ClientApp or ServerApp process per message) looks for
#: work every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (Flower: 1 s; 1.41 and 1.42).
SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"


def free_ports(count: int) -> list[int]:
    """``count`` distinct localhost TCP ports that were free a moment ago."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def kill_supernode(site_config: str | os.PathLike[str]) -> list[int]:
    """SIGKILL the SuperNode process (``flower-supernode``, or :data:`SUPERNODE_MODULE`)
    whose ``--node-config`` names
    ``site_config`` (a site dropping out, for tests and benchmarks); the PIDs killed."""
    killed = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith("flower-supernode") or a == SUPERNODE_MODULE for a in args) and any(
                os.fspath(site_config) in a for a in args):
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
    return killed


def stray_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``FEDIIM_DEPLOY_ID=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if ") Z" in stat:  # a zombie holds no resources; its parent reaps it
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def supernode_name(site_id: str) -> str:
    """The process (and log file) name of the SuperNode serving ``site_id``."""
    return f"supernode-{site_id}"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def _kill_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class ProcessGroup:
    """Named processes of one deployment, each in its own session and logging to
    ``log_dir/<name>.log``; every one carries ``marker`` in its environment so that
    :meth:`stop` also finds descendants that started their own session."""

    def __init__(self, log_dir: Path, cwd: Path, env: dict[str, str], marker: str) -> None:
        self.log_dir, self.cwd, self.env, self.marker = log_dir, cwd, env, marker
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._log_files: list[IO[bytes]] = []

    def log_path(self, name: str) -> Path:
        """Where process ``name`` writes its output."""
        return self.log_dir / f"{name}.log"

    def start(self, name: str, args: list[str],
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``args`` as process ``name`` (environment ``env``, default the group's)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path(name), "ab")  # closed in stop()
        self._log_files.append(log_file)
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env or self.env,
                                   start_new_session=True, cwd=self.cwd)
        self.processes.append((name, process))
        return process

    def exited(self) -> list[tuple[str, int]]:
        """(name, exit code) of every process that has exited, in the order they started."""
        return [(name, process.returncode) for name, process in self.processes
                if process.poll() is not None]

    def check_alive(self, tolerate: Container[str] = ()) -> None:
        """Raise :class:`DeployError`, with the end of its log, if any process not named in
        ``tolerate`` has exited."""
        for name, process in self.processes:
            if name not in tolerate and process.poll() is not None:
                raise DeployError(f"{name} exited with code {process.returncode}; its log "
                                  f"({self.log_path(name)}) ends with:\n"
                                  + _tail(self.log_path(name)))

    def stop(self, grace: float) -> list[int]:
        """Stop every process and its descendants; return the PIDs that had to be swept."""
        self._end_process_groups(grace)
        swept = self._sweep_strays(grace)
        for log_file in self._log_files:
            log_file.close()
        self._log_files.clear()
        self.processes.clear()
        return swept

    def _end_process_groups(self, grace: float) -> None:
        """SIGTERM to every group (last started first), SIGKILL to those still up after
        ``grace`` seconds."""
        for _, process in reversed(self.processes):
            if process.poll() is None:
                _kill_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(process.pid, signal.SIGKILL)
                process.wait(timeout=5)

    def _sweep_strays(self, grace: float) -> list[int]:
        """Processes that left our process groups (``flower-superexec`` starts a new
        session) exit when their parent does; give them ``grace`` seconds, then end them by
        PID."""
        deadline = time.monotonic() + grace
        while stray_processes(self.marker) and time.monotonic() < deadline:
            time.sleep(_SHORT_POLL)
        swept: list[int] = []
        for pid in stray_processes(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
                swept.append(pid)
            except ProcessLookupError:
                pass
        return swept


@dataclass(frozen=True)
class DroppedSite:
    """A site whose SuperNode exited while the deployment was up."""

    site_id: str
    exit_code: int  # negative: killed by that signal (-9: SIGKILL)
    detected_at: str  # UTC, ISO 8601; within a few seconds of the exit (polling)
    seconds_into_run: float | None  # since the run was submitted (None: before that)
    log: str  # the SuperNode's log file

    def to_dict(self) -> dict[str, Any]:
        """This dropout as JSON-ready fields (``deploy.json``'s ``dropped`` list)."""
        return asdict(self)


class LocalDeployment:
    """One SuperLink + one SuperNode per site on localhost, with TLS and node authentication
    (or, with ``simulation=True``, a simulation SuperLink running the sites as Ray actors).

    Use as a context manager; every process is stopped and the temporary ``FLWR_HOME``
    removed on exit. ``short_polls`` (default) starts the SuperNodes through
    :mod:`fediim.deploy.supernode` and lets every SuperExec look for work every
    :data:`SUPEREXEC_POLL_SECONDS`: each round waits less for Flower's polling.
    """

    def __init__(self, layout: FederationLayout, *, node_auth: bool = True,
                 log_dir: Path | None = None, simulation: bool = False,
                 short_polls: bool = True) -> None:
        self.layout = layout
        self.node_auth = node_auth
        self.short_polls = short_polls and not simulation  # local-deploy's SuperNodes only
        self.simulation = simulation
        self.log_dir = log_dir or layout.out / "logs"
        self.marker = uuid.uuid4().hex
        self.home = Path(tempfile.mkdtemp(prefix="fediim-flwr-home-"))
        self.bindir = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "PATH": str(self.bindir) + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            MARKER_ENV: self.marker,
        }
        if self.short_polls:
            self.env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_SECONDS)
        self.processes = ProcessGroup(self.log_dir, self.home, self.env, self.marker)
        self.ca_cert: Path | None = None
        self.port = 0
        self.run_id: int | None = None
        self.swept: list[int] = []
        self.dropped: list[DroppedSite] = []
        #: SuperNode process name -> site id
        self._supernode_sites = {supernode_name(s.site_id): s.site_id for s in layout.sites}
        self._submitted_at: float | None = None
        self.label = "fediim simulate" if simulation else "fediim local-deploy"

    # -- context management -----------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _say(self, message: str) -> None:
        print(f"{self.label}: {message}", file=sys.stderr, flush=True)

    def executable(self, name: str) -> str:
        """Flower's command ``name`` from this Python's environment, else from PATH."""
        path = self.bindir / name
        return str(path) if path.exists() else name

    def start_process(self, name: str, args: list[str],
                      env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a process that :meth:`stop` will stop (see :class:`ProcessGroup`)."""
        return self.processes.start(name, args, env)

    def _flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.executable("flwr"), *args], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def stop(self, grace: float = 10.0) -> list[int]:
        """Stop everything this deployment started; return PIDs that had to be swept."""
        swept = self.processes.stop(grace)
        self.swept += swept
        shutil.rmtree(self.home, ignore_errors=True)
        return swept

    # -- setup ------------------------------------------------------------------------
    def start(self, ready_timeout: float = 60.0) -> None:
        """Certificates, SuperLink, node registration, SuperNodes."""
        if self.simulation:
            self._start_simulation(ready_timeout)
            return
        from fediim.protocol.tls import write_tls_files

        tls = write_tls_files(self.home / "pki")
        tls.ca_key.unlink()  # it has signed the SuperLink's certificate; nothing else needs it
        self.ca_cert = tls.ca_cert
        ports = free_ports(1 + len(self.layout.sites))
        self.port = ports[0]
        self._write_connection(f"root-certificates = {json.dumps(str(tls.ca_cert))}")
        superlink = [self.executable("flower-superlink"), "--port", str(self.port),
                     "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile",
                     str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
                     "--disable-runtime-dependency-installation"]
        if self.node_auth:
            superlink.append("--enable-supernode-auth")
        self._say(f"starting SuperLink on 127.0.0.1:{self.port} (TLS"
                  f"{', node authentication' if self.node_auth else ''})")
        self.start_process("superlink", superlink)
        self._wait_healthy(ready_timeout)
        if self.node_auth:
            self._register_nodes()
        self._start_supernodes(ports[1:])

    def _write_connection(self, security: str) -> None:
        """The ``flwr`` connection to this deployment's SuperLink, as the default one."""
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n', encoding="utf-8")

    def _node_key(self, site_id: str) -> Path:
        return self.home / "nodes" / f"{site_id}.key"

    def _start_supernodes(self, ports: list[int]) -> None:
        """One SuperNode per site, each with its own ``FLWR_HOME`` and localhost port (with
        ``short_polls``, started through :data:`SUPERNODE_MODULE`)."""
        sites = self.layout.sites
        command = ([sys.executable, "-m", SUPERNODE_MODULE] if self.short_polls
                   else [self.executable("flower-supernode")])
        for site, port in zip(sites, ports, strict=True):
            args = [*command, "--superlink", f"127.0.0.1:{self.port}",
                    "--port", str(port), "--root-certificates", str(self.ca_cert),
                    "--node-config", f"site-config={json.dumps(str(site.config))}"]
            if self.node_auth:
                args += ["--auth-supernode-private-key", str(self._node_key(site.site_id))]
            node_home = self.home / "nodes" / site.site_id
            node_home.mkdir(parents=True, exist_ok=True)
            self.start_process(supernode_name(site.site_id), args,
                               {**self.env, "FLWR_HOME": str(node_home)})
        self._say(f"started {len(sites)} SuperNode(s): {', '.join(s.site_id for s in sites)}")

    def _start_simulation(self, ready_timeout: float) -> None:
        """A SuperLink in simulation mode (localhost only, no SuperNodes: the Simulation
        Engine runs the ClientApps as Ray actors inside it)."""
        self.ca_cert = None
        self.port = free_ports(1)[0]
        self._write_connection("insecure = true")
        self._say(f"starting a simulation SuperLink on 127.0.0.1:{self.port}")
        self.start_process("superlink", [
            self.executable("flower-superlink"), "--insecure", "--simulation",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation"])
        self._wait_healthy(ready_timeout)

    def _register_nodes(self) -> None:
        """One EC key pair per SuperNode; register every public key with the SuperLink."""
        from fediim.protocol.tls import write_node_auth_keypair

        pending = []
        for site in self.layout.sites:
            key = self._node_key(site.site_id)
            public_key = key.with_suffix(".pub")
            write_node_auth_keypair(key, public_key)
            pending.append((site.site_id, subprocess.Popen(
                [self.executable("flwr"), "supernode", "register", str(public_key), CONNECTION,
                 "--name", site.site_id, "--format", "json"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=self.home)))
        failed = []
        for site_id, process in pending:
            output, _ = process.communicate(timeout=120)
            if process.returncode != 0:
                failed.append(f"{site_id}: {output.decode(errors='replace').strip()}")
        if failed:
            raise DeployError("registering the SuperNodes' keys failed:\n" + "\n".join(failed))

    def _wait_healthy(self, timeout: float) -> None:
        """Wait until the SuperLink answers ``/health`` (a DeployError if it exits or is
        not healthy within ``timeout`` seconds)."""
        context = ssl.create_default_context(cafile=str(self.ca_cert)) if self.ca_cert else None
        url = f"{'https' if self.ca_cert else 'http'}://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.watch()
            try:
                with urllib.request.urlopen(url, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(_SHORT_POLL)
        raise DeployError(f"the SuperLink was not healthy within {timeout:g} s")

    # -- watching -------------------------------------------------------------------------
    def watch(self) -> None:
        """Raise :class:`DeployError` if the SuperLink has exited; note every SuperNode that
        has exited as a dropped site (the coordinator's quorum decides what that means)."""
        self.processes.check_alive(tolerate=self._supernode_sites)
        self._note_dropouts()

    def _note_dropouts(self) -> None:
        """Record (once each, and say) every SuperNode that has exited."""
        noted = {dropped.site_id for dropped in self.dropped}
        for name, code in self.processes.exited():
            site_id = self._supernode_sites.get(name)
            if site_id is None or site_id in noted:
                continue
            into_run = (None if self._submitted_at is None
                        else round(time.monotonic() - self._submitted_at, 1))
            dropped = DroppedSite(site_id, code, datetime.now(UTC).isoformat(timespec="seconds"),
                                  into_run, str(self.processes.log_path(name)))
            self.dropped.append(dropped)
            self._say(f"site {site_id} dropped out: its SuperNode exited with code {code} at "
                      f"{dropped.detected_at}; the run goes on if the coordinator's quorum "
                      f"holds (log: {dropped.log})")

    # -- the run ------------------------------------------------------------------------
    def run(self, timeout: float = DEFAULT_RUN_TIMEOUT) -> dict[str, Any]:
        """Submit the app and follow its log stream; return ``flwr ls``'s record of the run.
        SuperNodes that exit meanwhile are noted in :attr:`dropped`.

        ``flwr run --stream`` exits when the run ends (with code 0 even if it failed), so
        the outcome is always read from ``flwr ls --format json``.
        """
        deadline = time.monotonic() + timeout
        log_path = self.log_dir / "run.log"
        self._submitted_at = time.monotonic()
        exit_code = self._submit_and_stream(self._write_app(), log_path, deadline)
        found = re.search(r"Successfully started run (\d+)",
                          log_path.read_text(encoding="utf-8", errors="replace"))
        if found is None:
            raise DeployError(f"flwr run did not start a run (exit {exit_code}):\n"
                              + _tail(log_path, 30))
        self.run_id = int(found.group(1))
        status = self._wait_finished(deadline, timeout)
        self._note_dropouts()  # one that exited after the last look is a dropout too
        return status

    def _write_app(self) -> Path:
        """The Flower app directory: a pyproject naming the installed apps, the run config."""
        app_dir = self.home / APP_DIR_NAME
        app_dir.mkdir(exist_ok=True)
        (app_dir / "pyproject.toml").write_text(app_pyproject(self.layout.run_config),
                                                encoding="utf-8")
        return app_dir

    def _submit_and_stream(self, app_dir: Path, log_path: Path, deadline: float) -> int | None:
        """``flwr run --stream``, its output copied to ``log_path`` (each line stamped with
        seconds since submission) until it exits or ``deadline``; return its exit code."""
        command = [self.executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        if self.simulation:
            command += ["--federation-config", f"num-supernodes={len(self.layout.sites)}"]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as log_file:
            stream = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=self.env, cwd=self.home,
                                      start_new_session=True)
            copier = threading.Thread(target=_copy_stamped, args=(stream, log_file),
                                      daemon=True)
            copier.start()
            try:
                while stream.poll() is None and time.monotonic() < deadline:
                    self.watch()
                    time.sleep(_STREAM_POLL)
            finally:
                if stream.poll() is None:
                    os.killpg(stream.pid, signal.SIGTERM)
                    stream.wait(timeout=10)
                copier.join(timeout=10)
        return stream.returncode

    def _wait_finished(self, deadline: float, timeout: float) -> dict[str, Any]:
        """The run's ``flwr ls`` record once it is finished; at ``deadline``, stop the run
        and raise :class:`DeployError`."""
        status: dict[str, Any] = {}
        while True:
            status = self._status()
            if str(status.get("status", "")).startswith("finished"):
                return status
            if time.monotonic() >= deadline:
                break
            self.watch()
            time.sleep(_STATUS_POLL)
        self._flwr("stop", str(self.run_id), CONNECTION)
        raise DeployError(f"run {self.run_id} did not finish within {timeout:g} s "
                          f"(last status {status.get('status')!r})")

    def _status(self) -> dict[str, Any]:
        result = self._flwr("ls", CONNECTION, "--run-id", str(self.run_id), "--format", "json")
        try:
            runs = json.loads(result.stdout).get("runs", [])
            return next(run for run in runs if int(run["run-id"]) == self.run_id)
        except (ValueError, StopIteration, KeyError, TypeError, AttributeError):
            return {}


def _copy_stamped(stream: subprocess.Popen[bytes], log_file: IO[str]) -> None:
    """Copy ``stream``'s output to ``log_file``, each line stamped with seconds since now."""
    assert stream.stdout is not None
    started = time.monotonic()
    for raw in stream.stdout:
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        log_file.write(f"[{time.monotonic() - started:6.1f}s] {line}\n")
        log_file.flush()
