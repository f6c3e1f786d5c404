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
   ``flwr run``'s exit code). A SuperNode that exits meanwhile is a site that dropped out,
   not a failure: it is said, recorded in ``DIR/logs/deploy.json`` (``dropped``: site id,
   exit code, time) and the run goes on; the coordinator's quorum (``min-sites``) decides
   whether it completes. The SuperLink exiting is a failure.
4. It stops every process it started — also on failure, Ctrl-C or SIGTERM — by process
   group, then sweeps any process that still carries this deployment's marker in its
   environment (Flower's ``flower-superexec`` starts its own session), and removes the
   temporary ``FLWR_HOME``.

Processes' logs go to ``DIR/logs``. The node keys live only in the temporary ``FLWR_HOME``
(0700); the CA key is deleted as soon as it has signed the SuperLink's certificate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fediim.deploy.layout import FederationLayout, prepare_federation
from fediim.deploy.supervisor import DEFAULT_RUN_TIMEOUT, MARKER_ENV, LocalDeployment
from fediim.errors import RunNotCompleted, SimulationUnavailable
from fediim.io.atomic import atomic_write_text
from fediim.protocol.run_config import RUN_CONFIG_DEFAULTS

__all__ = ["local_deploy", "simulation_engine_available"]

#: The run's status in ``flwr ls`` when it completed.
COMPLETED = "finished:completed"


def simulation_engine_available() -> bool:
    """Whether Flower's Simulation Engine can run here: it needs Ray (extra ``sim``)."""
    return importlib.util.find_spec("ray") is not None


def local_deploy(
    data: Sequence[str | os.PathLike[str]],
    schema: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epsilon: float = RUN_CONFIG_DEFAULTS["epsilon"],
    delta: float = RUN_CONFIG_DEFAULTS["delta"],
    min_sites: int | None = None,
    budget_epsilon: float | None = None,
    run_config: dict[str, Any] | None = None,
    node_auth: bool = True,
    timeout: float = DEFAULT_RUN_TIMEOUT,
    insecure_seeded_noise: bool = False,
    simulation: bool = False,
    short_polls: bool = True,
) -> dict[str, Any]:
    """Prepare ``out``, deploy, run, stop; return the federation view (``federation.json``).

    ``simulation=True`` runs the same apps on Flower's Simulation Engine instead (needs Ray,
    the ``sim`` extra): a simulation SuperLink, no SuperNodes, each simulated node mapped to
    a site TOML by its partition id (run-config ``site-configs``). ``short_polls=False``
    keeps Flower's own poll intervals (see :class:`LocalDeployment`).

    Raises :class:`SimulationUnavailable` before writing anything when simulating without
    Ray, :class:`RunNotCompleted` when the run does not finish as completed (what is known of
    it is its ``.federation``), and :class:`DeployError` when the deployment fails.
    """
    if simulation and not simulation_engine_available():
        raise SimulationUnavailable("the Simulation Engine needs Ray, which is not installed: "
                                    "pip install 'fediim[sim]' (or use local-deploy)")
    layout = prepare_federation(data, schema, out, epsilon=epsilon, delta=delta,
                                budget_epsilon=budget_epsilon, min_sites=min_sites,
                                insecure_seeded_noise=insecure_seeded_noise, run_config=run_config)
    if simulation:
        layout.run_config["site-configs"] = json.dumps([str(s.config) for s in layout.sites])
    deployment = LocalDeployment(layout, node_auth=node_auth, simulation=simulation,
                                 short_polls=short_polls)
    with _sigterm_as_interrupt():
        status, record = _run_recorded(deployment, timeout)
    view = _federation_view(layout)
    view["deploy"] = record
    if status.get("status") != COMPLETED:
        raise RunNotCompleted(
            f"run {deployment.run_id} ended as {status.get('status')!r}"
            + (f": {view['error']}" if view.get("error") else "")
            + f" (logs in {deployment.log_dir})", federation=view)
    return view


def _run_recorded(deployment: LocalDeployment,
                  timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start, run and stop ``deployment``, timing each phase; whatever happens, write the
    deployment's record to ``logs/deploy.json``. Returns (the run's ``flwr ls`` record,
    the deployment's record)."""
    record: dict[str, Any] = {"flwr_home": str(deployment.home), "marker": deployment.marker,
                              "marker_env": MARKER_ENV}
    phase_seconds: dict[str, float] = {}
    status: dict[str, Any] = {}
    started = time.monotonic()
    try:
        with deployment:
            phase_started = time.monotonic()
            deployment.start()
            phase_seconds["start"] = time.monotonic() - phase_started
            phase_started = time.monotonic()
            status = deployment.run(timeout=timeout)
            phase_seconds["run"] = time.monotonic() - phase_started
            phase_started = time.monotonic()
        phase_seconds["stop"] = time.monotonic() - phase_started
    except BaseException as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record.update({"status": status.get("status"), "details": status.get("status-details"),
                       "seconds": round(time.monotonic() - started, 1),
                       "run_id": deployment.run_id,
                       "phase_seconds": {k: round(v, 1) for k, v in phase_seconds.items()},
                       "dropped": [dropped.to_dict() for dropped in deployment.dropped],
                       "stray_processes_swept": deployment.swept})
        deployment.log_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(deployment.log_dir / "deploy.json", json.dumps(record, indent=2) + "\n")
    return status, record


def _federation_view(layout: FederationLayout) -> dict[str, Any]:
    """The coordinator's ``federation.json``, or an empty view if it was never written."""
    view_path = layout.coordinator_dir / "federation.json"
    if not view_path.exists():
        return {}
    return json.loads(view_path.read_text(encoding="utf-8"))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so every process is stopped as on
    Ctrl-C); only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
