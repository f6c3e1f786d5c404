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
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from fediim.deploy.layout import prepare_federation
from fediim.deploy.supervisor import MARKER_ENV, LocalDeployment
from fediim.errors import DeployError
from fediim.io.atomic import atomic_write_text

__all__ = ["local_deploy"]


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
