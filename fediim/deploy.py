"""``fediim local-deploy``: a real Flower deployment on this machine, started and stopped.

What it does, in order:

1. :func:`prepare_federation` lays out ``DIR``: the coordinator's Ed25519 signing key
   (``DIR/coordinator/signing.key``, 0600) and public key, and per site ``DIR/<site>/site.toml``
   naming the site's data file, the schema, its ledger (``DIR/<site>/ledger.json``), its
   output directory (``DIR/<site>``) and the pinned coordinator public key.
2. :class:`LocalDeployment` creates a temporary ``FLWR_HOME`` holding a fresh CA and a
   SuperLink certificate (SAN ``localhost``, ``127.0.0.1``), per-SuperNode EC keys for node
   authentication, a minimal Flower app (``pyproject.toml`` naming ``coordinator.app:app``
   and ``site_client.app:app`` with the run configuration) and the ``flwr`` connection
   (``[superlink.local-deploy]`` in ``$FLWR_HOME/config.toml``). It starts one SuperLink (TLS,
   in-memory state, ``--enable-supernode-auth``, no runtime dependency installation) and,
   after registering each node's public key, one SuperNode per site on free localhost ports.
3. It submits the run with ``flwr run`` and follows it with ``flwr ls --format json`` until
   the run is finished; success is the run's final status ``finished:completed`` (never
   ``flwr run``'s exit code).
4. It stops every process it started — also on failure, Ctrl-C or SIGTERM — by process
   group, then sweeps any process that still carries this deployment's marker in its
   environment (Flower's ``flower-superexec`` starts its own session), and removes the
   temporary ``FLWR_HOME``.

Processes' logs go to ``DIR/logs``. The CA key and node keys live only in the temporary
``FLWR_HOME``.
"""

from __future__ import annotations

import importlib.util
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fediim.argtypes import positive_float, positive_int
from fediim.atomic import atomic_write_text

# Heavier modules (flwr, OpenDP, cryptography) are imported where used, so that importing
# this module (``fediim --help``) stays cheap.

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # as fediim.site_config

__all__ = [
    "CONNECTION",
    "DeployError",
    "FederationLayout",
    "LocalDeployment",
    "SiteLayout",
    "app_pyproject",
    "prepare_federation",
    "stray_processes",
]

CONNECTION = "local-deploy"
MARKER_ENV = "FEDIIM_DEPLOY_ID"
APP_DIR_NAME = "fediim-app"


class DeployError(RuntimeError):
    """The deployment could not be started, or the run did not complete."""


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class SiteLayout:
    """One site's files under ``DIR/<site_id>``."""

    site_id: str
    data: Path
    directory: Path
    config: Path
    ledger: Path


@dataclass(frozen=True)
class FederationLayout:
    """What :func:`prepare_federation` wrote."""

    out: Path
    schema: Path
    coordinator_dir: Path
    signing_key: Path
    public_key: Path
    sites: tuple[SiteLayout, ...]
    run_config: dict[str, Any] = field(default_factory=dict)


def _site_ids(data: Sequence[Path]) -> list[str]:
    """Site ids from the data files' names: safe characters only, unique."""
    ids: list[str] = []
    for p in data:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem).strip("-._") or "site"
        if not re.match(SITE_ID_PATTERN, base):
            base = ("site-" + base)[:64]
        sid, i = base, 2
        while sid in ids:
            sid, i = f"{base}-{i}", i + 1
        ids.append(sid)
    return ids


def prepare_federation(
    data: Sequence[str | os.PathLike[str]],
    schema: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epsilon: float = 1.0,
    delta: float = 1e-6,
    budget_epsilon: float | None = None,
    min_sites: int | None = None,
    site_ids: Sequence[str] | None = None,
    allow_seeded_noise: bool = False,
    run_config: dict[str, Any] | None = None,
) -> FederationLayout:
    """Write the coordinator key and one site TOML per data file under ``out``.

    Each site's budget is ``budget_epsilon`` (default: this run's ``epsilon``) at ``delta``.
    An existing signing key in ``out/coordinator`` is reused, and existing ledgers are kept:
    spend accumulates across runs into the same ``out``.
    """
    from fediim.schema import load_schema
    from fediim.signing import load_private_key, write_keypair
    from fediim.site_config import Budget, SiteConfig, site_config_toml

    out_dir = Path(out).resolve()
    schema_path = Path(schema).resolve()
    load_schema(schema_path).bounds_array()  # fail early, naming the file
    files = [Path(p).resolve() for p in data]
    if not files:
        raise DeployError("at least one --data file is needed")
    ids = list(site_ids) if site_ids is not None else _site_ids(files)
    if len(ids) != len(files) or len(set(ids)) != len(ids):
        raise DeployError(f"need one unique site id per data file, got {ids}")
    coord = out_dir / "coordinator"
    coord.mkdir(parents=True, exist_ok=True)
    key, pub = coord / "signing.key", coord / "coordinator.pub"
    if key.exists() and pub.exists():
        load_private_key(key)
    else:
        write_keypair(key, pub)
    budget = Budget(epsilon=budget_epsilon if budget_epsilon is not None else epsilon,
                    delta=delta)
    sites = []
    for sid, f in zip(ids, files, strict=True):
        d = out_dir / sid
        d.mkdir(parents=True, exist_ok=True)
        cfg = SiteConfig(site_id=sid, data=f, schema=schema_path, ledger=d / "ledger.json",
                         output_dir=d, coordinator_public_key=pub, budget=budget,
                         allow_seeded_noise=allow_seeded_noise)
        atomic_write_text(d / "site.toml", site_config_toml(cfg))
        sites.append(SiteLayout(sid, f, d, d / "site.toml", d / "ledger.json"))
    rc = {
        "schema": str(schema_path), "signing-key": str(key), "out-dir": str(coord),
        "min-sites": int(min_sites if min_sites is not None else len(files)),
        "expected-sites": len(files), "epsilon": float(epsilon), "delta": float(delta),
        **(run_config or {}),
    }
    return FederationLayout(out_dir, schema_path, coord, key, pub, tuple(sites), rc)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        return r if any(c in r for c in ".eEn") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"unsupported run-config value {v!r}")


def app_pyproject(run_config: dict[str, Any]) -> str:
    """A minimal Flower app: the installed ``coordinator``/``site_client`` apps + config."""
    from fediim.messages import RUN_CONFIG_DEFAULTS

    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise DeployError(f"unknown run-config keys {unknown}")
    merged = {**RUN_CONFIG_DEFAULTS, **run_config}
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{APP_DIR_NAME}"',
        'version = "0.1.0"',
        'description = "fediim local deployment (apps come from the installed fediim)"',
        'license = "Apache-2.0"',
        'dependencies = ["flwr>=1.41,<1.43"]',
        "",
        "[tool.flwr.app]",
        'publisher = "fediim"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "coordinator.app:app"',
        'clientapp = "site_client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f'"{k}" = {_toml_value(v)}' for k, v in merged.items()),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- processes


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
        from fediim.tls import write_tls_files

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
        from fediim.tls import write_node_auth_keypair

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


def local_deploy(
    data: Sequence[str | os.PathLike[str]],
    schema: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epsilon: float = 1.0,
    delta: float = 1e-6,
    min_sites: int | None = None,
    budget_epsilon: float | None = None,
    run_config: dict[str, Any] | None = None,
    node_auth: bool = True,
    timeout: float = 600.0,
    allow_seeded_noise: bool = False,
    simulation: bool = False,
) -> dict[str, Any]:
    """Prepare ``out``, deploy, run, stop; return the federation view (``federation.json``).

    ``simulation=True`` runs the same apps on Flower's Simulation Engine instead (needs Ray,
    the ``sim`` extra): a simulation SuperLink, no SuperNodes, each simulated node mapped to
    a site TOML by its partition id (run-config ``site-configs``).

    Raises :class:`DeployError` when the run does not finish as completed (the federation
    view, if written, is attached as ``.federation``).
    """
    if simulation and importlib.util.find_spec("ray") is None:
        raise DeployError("the Simulation Engine needs Ray, which is not installed: "
                          "pip install 'fediim[sim]' (or use local-deploy)")
    layout = prepare_federation(data, schema, out, epsilon=epsilon, delta=delta,
                                budget_epsilon=budget_epsilon, min_sites=min_sites,
                                allow_seeded_noise=allow_seeded_noise, run_config=run_config)
    if simulation:
        layout.run_config["site-configs"] = json.dumps([str(s.config) for s in layout.sites])
    view_path = layout.coordinator_dir / "federation.json"
    started = time.monotonic()
    previous = signal.getsignal(signal.SIGTERM)

    def _on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_sigterm)
    timings: dict[str, float] = {}
    status: dict[str, Any] = {}
    dep = LocalDeployment(layout, node_auth=node_auth, simulation=simulation)
    info: dict[str, Any] = {"flwr_home": str(dep.home), "marker": dep.marker,
                            "marker_env": MARKER_ENV}
    try:
        with dep:
            t0 = time.monotonic()
            dep.start()
            timings["start"] = time.monotonic() - t0
            t0 = time.monotonic()
            status = dep.run(timeout=timeout)
            timings["run"] = time.monotonic() - t0
            t0 = time.monotonic()
        timings["stop"] = time.monotonic() - t0
    except BaseException as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        info.update({"status": status.get("status"), "details": status.get("status-details"),
                     "seconds": round(time.monotonic() - started, 1), "run_id": dep.run_id,
                     "phase_seconds": {k: round(v, 1) for k, v in timings.items()},
                     "stray_processes_swept": dep.swept})
        dep.log_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dep.log_dir / "deploy.json", json.dumps(info, indent=2) + "\n")
    view: dict[str, Any] = {}
    if view_path.exists():
        view = json.loads(view_path.read_text(encoding="utf-8"))
    view["deploy"] = info
    if status.get("status") != "finished:completed":
        err = DeployError(
            f"run {dep.run_id} ended as {status.get('status')!r}"
            + (f": {view['error']}" if view.get("error") else "")
            + f" (logs in {layout.out / 'logs'})")
        err.federation = view  # type: ignore[attr-defined]
        raise err
    return view


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- CLI


_DESCRIPTION = """\
Run a real federation on this machine: one Flower SuperLink (TLS, node authentication) and
one SuperNode per --data file, each SuperNode acting as a hospital with its own data,
privacy ledger and outputs. The coordinator asks every site for a handshake, a private
release of its noised cells (charged to the site's ledger first) and, with the signed
model bank, a local imputation of its own records. Nothing but noised statistics and
counts leaves a site.

Layout of OUT:
  OUT/<site>/site.toml          the site's configuration (data, schema, ledger, budget,
                                pinned coordinator public key)
  OUT/<site>/imputed.csv        the site's table with its gaps filled (same columns)
  OUT/<site>/flags.csv          per cell: imputed flag and uncertainty
  OUT/<site>/audit.jsonl        one line per imputed cell
  OUT/<site>/ledger.json        the site's privacy ledger (persists across runs)
  OUT/<site>/bank.npz, bank.sig.json   the signed federation bank the site used
  OUT/coordinator/federation.json      every site's stages, reasons and reported spend
  OUT/coordinator/signing.key, coordinator.pub   the coordinator's Ed25519 key pair
  OUT/logs/                     SuperLink, SuperNode and run logs

Site ids are the data files' names (A.csv -> A). Each site's budget defaults to this
run's --epsilon: running again into the same OUT is refused by the sites once their
ledgers are spent (use --budget-epsilon for a larger total budget)."""

_EPILOG = """\
examples:
  fediim local-deploy --data a.csv --data b.csv --data c.csv --schema schema.toml --out fed
  fediim local-deploy --data a.csv --data b.csv --schema s.toml --out fed --epsilon 2 \\
      --min-sites 2 --budget-epsilon 10

exit codes: 0 the run completed, 1 the run failed (e.g. quorum not met; see the reasons
printed and OUT/coordinator/federation.json), 2 bad usage or input"""


def _add_run_arguments(p: Any) -> None:
    p.add_argument("--data", metavar="SITE.csv", action="append", required=True,
                   help="one site's table (repeat once per site)")
    p.add_argument("--schema", metavar="SCHEMA.toml", required=True,
                   help="the federation's schema (public bounds for every column)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--epsilon", type=positive_float, default=1.0,
                   help="privacy spend of this fit at every site (default: 1)")
    p.add_argument("--delta", type=positive_float, default=1e-6,
                   help="delta of the (epsilon, delta) guarantee (default: 1e-6)")
    p.add_argument("--min-sites", type=positive_int, default=None, metavar="N",
                   help="quorum: the run fails if fewer sites remain after any stage "
                        "(default: every site)")
    p.add_argument("--budget-epsilon", type=positive_float, default=None, metavar="E",
                   help="each site's total budget, kept in its ledger (default: --epsilon)")
    p.add_argument("--mode", choices=["hybrid", "federated", "local", "mean"],
                   default="hybrid", help="how sites impute (default: hybrid)")
    p.add_argument("--k", type=positive_int, default=10, help="neighbours (default: 10)")
    p.add_argument("--timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="give up on the run after this long (default: 600)")
    p.add_argument("--seed", type=int, default=None,
                   help="SIMULATION ONLY: seeded numpy noise instead of OpenDP's sampler "
                        "(reproducible, and removable by anyone who knows the seed)")


def register_local_deploy(sub: Any) -> None:
    """Register ``fediim local-deploy`` (called from :data:`fediim.cli.SUBCOMMANDS`)."""
    import argparse

    p = sub.add_parser("local-deploy", help="run a real Flower federation on localhost "
                       "(one SuperNode per data file)", description=_DESCRIPTION,
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(p)
    p.add_argument("--node-auth", action=argparse.BooleanOptionalAction, default=True,
                   help="SuperNode authentication with registered EC keys (default: on)")
    p.set_defaults(func=_run_local_deploy, simulation=False)


def register_simulate(sub: Any) -> None:
    """Register ``fediim simulate`` (called from :data:`fediim.cli.SUBCOMMANDS`)."""
    import argparse

    p = sub.add_parser(
        "simulate", help="run the same federation on Flower's Simulation Engine (needs Ray)",
        description="""\
Run the federation of 'fediim local-deploy' on Flower's Simulation Engine instead of real
SuperNodes: the same ServerApp and ClientApp, each simulated node mapped to one --data
file's site (same OUT layout, same ledgers and outputs). Needs Ray: pip install
'fediim[sim]'. Use --seed for reproducible studies.""",
        epilog="""\
example:
  fediim simulate --data a.csv --data b.csv --schema schema.toml --out sim --seed 1""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_arguments(p)
    p.set_defaults(func=_run_local_deploy, simulation=True, node_auth=False)


def _run_local_deploy(args: Any) -> int:
    from fediim.schema import SchemaError

    missing = [d for d in args.data if not Path(d).is_file()]
    if missing:
        print(f"error: data file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.delta >= 1:
        print("error: --delta must be < 1", file=sys.stderr)
        return 2
    if args.min_sites is not None and args.min_sites > len(args.data):
        print(f"error: --min-sites {args.min_sites} exceeds the {len(args.data)} site(s)",
              file=sys.stderr)
        return 2
    run_config: dict[str, Any] = {"mode": args.mode, "k": args.k}
    if args.seed is not None:
        run_config["seed"] = int(args.seed)
    try:
        view = local_deploy(args.data, args.schema, args.out, epsilon=args.epsilon,
                            delta=args.delta, min_sites=args.min_sites,
                            budget_epsilon=args.budget_epsilon, run_config=run_config,
                            node_auth=args.node_auth, timeout=args.timeout,
                            allow_seeded_noise=args.seed is not None,
                            simulation=args.simulation)
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DeployError as exc:
        _print_sites(getattr(exc, "federation", {}), Path(args.out))
        print(f"error: {exc}", file=sys.stderr)
        return 2 if "needs Ray" in str(exc) else 1
    except KeyboardInterrupt:
        print("error: interrupted; every process was stopped", file=sys.stderr)
        return 130
    _print_sites(view, Path(args.out))
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in view["deploy"]["phase_seconds"].items())
    print(f"fediim {'simulate' if args.simulation else 'local-deploy'}: run "
          f"{view['deploy']['run_id']} completed in "
          f"{view['deploy']['seconds']:.0f} s ({phases}) -> {Path(args.out).resolve()}",
          file=sys.stderr)
    return 0


def _print_sites(view: dict[str, Any], out: Path) -> None:
    for sid, site in sorted((view.get("sites") or {}).items()):
        ledger = site.get("ledger") or {}
        spend = (f"epsilon spent {ledger['epsilon_spent']:.3g} of {ledger['epsilon_budget']:.3g}"
                 if ledger else "no ledger reported")
        imp = site.get("stages", {}).get("impute", {})
        if site.get("active") and imp.get("code") == "ok":
            print(f"  {sid}: {imp['n_rows']} rows, {imp['n_imputed_cells']} cells imputed, "
                  f"{spend} -> {out / sid / 'imputed.csv'}", file=sys.stderr)
        elif site.get("active"):
            done = ", ".join(site.get("stages", {})) or "nothing"
            print(f"  {sid}: took part ({done}) but the run stopped; {spend}", file=sys.stderr)
        else:
            bad = next((f"{stage}: {st['code']}: {st['reason']}"
                        for stage, st in site.get("stages", {}).items()
                        if st.get("code") != "ok"), "excluded")
            print(f"  {sid}: EXCLUDED ({bad}); {spend}", file=sys.stderr)
