"""Supervision of a local federation's processes: SuperLink, SuperNodes, the run."""


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
from pathlib import Path
from typing import Any

from fediim.deploy.layout import APP_DIR_NAME, FederationLayout, app_pyproject
from fediim.errors import DeployError

__all__ = ["CONNECTION", "MARKER_ENV", "LocalDeployment", "stray_processes"]

CONNECTION = "local-deploy"
MARKER_ENV = "FEDIIM_DEPLOY_ID"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


class LocalDeployment:
    """One SuperLink + one SuperNode per site on localhost, with TLS and node authentication.

    Use as a context manager; every process is stopped on exit (see module docstring).
    """

    def __init__(self, layout: FederationLayout, *, node_auth: bool = True,
                 log_dir: Path | None = None, simulation: bool = False) -> None:
        self.layout = layout
        self.node_auth = node_auth
        self.simulation = simulation
        self.ca_cert: Path | None = None
        self.log_dir = log_dir or layout.out / "logs"
        self.marker = uuid.uuid4().hex
        self.home = Path(tempfile.mkdtemp(prefix="fediim-flwr-home-"))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[Any] = []
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            MARKER_ENV: self.marker,
        }
        self.bindir = Path(bindir)
        self.port = 0
        self.run_id: int | None = None
        self.swept: list[int] = []
        self.label = "fediim local-deploy"  # prefix of progress lines

    # -- context management -----------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _say(self, msg: str) -> None:
        print(f"{self.label}: {msg}", file=sys.stderr, flush=True)

    def _exe(self, name: str) -> str:
        p = self.bindir / name
        return str(p) if p.exists() else name

    # -- processes ------------------------------------------------------------------------
    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.log_dir / f"{name}.log", "ab")  # closed in stop()
        self._logs.append(fh)
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True, cwd=self.home)
        self.procs.append((name, proc))

    def _check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise DeployError(f"{name} exited with code {proc.returncode}; its log "
                                  f"({self.log_dir / (name + '.log')}) ends with:\n"
                                  + _tail(self.log_dir / f"{name}.log"))

    def _flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self._exe("flwr"), *args], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def stop(self, grace: float = 10.0) -> list[int]:
        """Stop everything this deployment started; return PIDs that had to be swept."""
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        # Processes that left our process groups (flower-superexec starts a new session)
        # exit when their parent does; give them a moment, then end them by PID.
        swept: list[int] = []
        deadline = time.monotonic() + grace
        while stray_processes(self.marker) and time.monotonic() < deadline:
            time.sleep(0.25)
        for pid in stray_processes(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
                swept.append(pid)
            except ProcessLookupError:
                pass
        self.swept += swept
        for fh in self._logs:
            fh.close()
        self._logs.clear()
        self.procs.clear()
        shutil.rmtree(self.home, ignore_errors=True)
        return swept

    # -- setup ------------------------------------------------------------------------
    def start(self, ready_timeout: float = 60.0) -> None:
        """Certificates, SuperLink, node registration, SuperNodes."""
        if self.simulation:
            self._start_simulation(ready_timeout)
            return
        from fediim.protocol.tls import write_tls_files

        pki = self.home / "pki"
        tls = write_tls_files(pki)
        self.ca_cert = tls.ca_cert
        sites = self.layout.sites
        ports = _free_ports(1 + len(sites))
        self.port = ports[0]
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = '
            f"{json.dumps(str(tls.ca_cert))}\n", encoding="utf-8")
        link = [self._exe("flower-superlink"), "--port", str(self.port),
                "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key),
                "--disable-runtime-dependency-installation"]
        if self.node_auth:
            link.append("--enable-supernode-auth")
        self._say(f"starting SuperLink on 127.0.0.1:{self.port} (TLS"
                  f"{', node authentication' if self.node_auth else ''})")
        self._start("superlink", link)
        self._wait_healthy(ready_timeout)
        if self.node_auth:
            self._register_nodes()
        for site, port in zip(sites, ports[1:], strict=True):
            args = [self._exe("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                    "--port", str(port), "--root-certificates", str(tls.ca_cert),
                    "--node-config", f"site-config={json.dumps(str(site.config))}"]
            if self.node_auth:
                args += ["--auth-supernode-private-key",
                         str(self.home / "nodes" / f"{site.site_id}.key")]
            env = {**self.env, "FLWR_HOME": str(self.home / "nodes" / site.site_id)}
            Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
            self._start(f"supernode-{site.site_id}", args, env)
        self._say(f"started {len(sites)} SuperNode(s): {', '.join(s.site_id for s in sites)}")

    def _start_simulation(self, ready_timeout: float) -> None:
        """A SuperLink in simulation mode (localhost only, no SuperNodes: the Simulation
        Engine runs the ClientApps as Ray actors inside it)."""
        self.ca_cert = None
        self.label = "fediim simulate"
        self.port = _free_ports(1)[0]
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n', encoding="utf-8")
        self._say(f"starting a simulation SuperLink on 127.0.0.1:{self.port}")
        self._start("superlink", [self._exe("flower-superlink"), "--insecure", "--simulation",
                                  "--host", "127.0.0.1", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        self._wait_healthy(ready_timeout)

    def _register_nodes(self) -> None:
        """One EC key pair per SuperNode; register every public key with the SuperLink."""
        from fediim.protocol.tls import write_node_auth_keypair

        pending = []
        for site in self.layout.sites:
            key = self.home / "nodes" / f"{site.site_id}.key"
            pub = self.home / "nodes" / f"{site.site_id}.pub"
            write_node_auth_keypair(key, pub)
            pending.append((site.site_id, subprocess.Popen(
                [self._exe("flwr"), "supernode", "register", str(pub), CONNECTION, "--name",
                 site.site_id, "--format", "json"], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=self.home)))
        failed = []
        for sid, proc in pending:
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                failed.append(f"{sid}: {out.decode(errors='replace').strip()}")
        if failed:
            raise DeployError("registering the SuperNodes' keys failed:\n" + "\n".join(failed))

    def _wait_healthy(self, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_cert)) if self.ca_cert else None
        url = f"{'https' if self.ca_cert else 'http'}://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise DeployError(f"the SuperLink was not healthy within {timeout:g} s")

    # -- the run ------------------------------------------------------------------------
    def run(self, timeout: float = 600.0) -> dict[str, Any]:
        """Submit the app and follow its log stream; return ``flwr ls``'s record of the run.

        ``flwr run --stream`` exits when the run ends (with code 0 even if it failed), so
        the outcome is always read from ``flwr ls --format json``.
        """
        app = self.home / APP_DIR_NAME
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(app_pyproject(self.layout.run_config),
                                            encoding="utf-8")
        log_path = self.log_dir / "run.log"
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        with open(log_path, "w", encoding="utf-8") as fh:
            cmd = [self._exe("flwr"), "run", str(app), CONNECTION, "--stream"]
            if self.simulation:
                cmd += ["--federation-config", f"num-supernodes={len(self.layout.sites)}"]
            stream = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=self.env, cwd=self.home,
                                      start_new_session=True)

            def _copy() -> None:  # the run's log, each line stamped with seconds since submit
                assert stream.stdout is not None
                for raw in stream.stdout:
                    line = raw.decode("utf-8", errors="replace").rstrip("\n")
                    fh.write(f"[{time.monotonic() - t0:6.1f}s] {line}\n")
                    fh.flush()

            copier = threading.Thread(target=_copy, daemon=True)
            copier.start()
            try:
                while stream.poll() is None and time.monotonic() < deadline:
                    self._check_alive()
                    time.sleep(0.5)
            finally:
                if stream.poll() is None:
                    os.killpg(stream.pid, signal.SIGTERM)
                    stream.wait(timeout=10)
                copier.join(timeout=10)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        found = re.search(r"Successfully started run (\d+)", text)
        if found is None:
            raise DeployError(f"flwr run did not start a run (exit {stream.returncode}):\n"
                              + _tail(log_path, 30))
        self.run_id = int(found.group(1))
        status: dict[str, Any] = {}
        while True:
            status = self._status()
            if str(status.get("status", "")).startswith("finished"):
                return status
            if time.monotonic() >= deadline:
                break
            self._check_alive()
            time.sleep(2.0)
        self._flwr("stop", str(self.run_id), CONNECTION)
        raise DeployError(f"run {self.run_id} did not finish within {timeout:g} s "
                          f"(last status {status.get('status')!r})")

    def _status(self) -> dict[str, Any]:
        res = self._flwr("ls", CONNECTION, "--run-id", str(self.run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout).get("runs", [])
            return next(r for r in runs if int(r["run-id"]) == self.run_id)
        except (ValueError, StopIteration, KeyError, TypeError, AttributeError):
            return {}
