"""The coordinator's Flower ServerApp (``coordinator.app:app``): handshake, release (per
site, or the secure rounds), impute — see :mod:`coordinator.run`; configuration in
:mod:`coordinator.config`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.config import CoordinatorConfig
from coordinator.run import run_federation
from fediim.protocol.clock import SYSTEM_CLOCK, Clock

__all__ = ["app", "make_server_app"]


def make_server_app(clock: Clock = SYSTEM_CLOCK) -> ServerApp:
    """A ServerApp running one federated imputation per run, waiting on ``clock`` (tests pass
    a fake clock so that timeouts cost no real time)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """Run one federated imputation; raises (the run fails) when quorum is not met."""
        cfg = CoordinatorConfig.from_run_config(dict(context.run_config))
        run_federation(grid, cfg, context.run_id, clock=clock)

    return server_app


app = make_server_app()
