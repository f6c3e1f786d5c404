"""One fediim run through a Flower ``Grid``: the handshake, then the per-site release
(:mod:`coordinator.federation`) or the secure rounds (:mod:`coordinator.secure`), then
the impute stage."""

from __future__ import annotations

import json
import logging
from typing import Any

from flwr.serverapp import Grid

from coordinator.config import CoordinatorConfig
from coordinator.federation import _Federation
from coordinator.secure import secure_bank
from fediim.errors import QuorumNotMet
from fediim.protocol.clock import SYSTEM_CLOCK, Clock

__all__ = ["run_federation"]

log = logging.getLogger("flwr.fediim.coordinator")


def run_federation(grid: Grid, cfg: CoordinatorConfig, run_id: int, *,
                   clock: Clock = SYSTEM_CLOCK) -> dict[str, Any]:
    """Run the three stages; return the federation view (also in ``out-dir``).

    Raises :class:`QuorumNotMet` when too few sites remain after a stage, and
    configuration errors (schema, signing key) before anything is sent. Every wait (for
    SuperNodes, for replies) is measured and spent on ``clock``.
    """
    fed = _Federation(grid, cfg, run_id, clock)
    log.info("fediim run %d: epsilon=%g delta=%g (rho=%.6g per site), min-sites %d%s",
             fed.run_id, cfg.epsilon, cfg.delta, fed.rho, cfg.min_sites,
             ", SEEDED NOISE (simulation only)" if cfg.seed >= 0 else "")
    try:
        fed.handshake()
        fed.impute(secure_bank(fed) if fed.choose_aggregation() else fed.per_site_bank())
    except QuorumNotMet:
        raise
    except Exception as exc:
        fed.write_view("failed", f"{type(exc).__name__}: {exc}")
        raise
    fed.write_view("completed")
    log.info("fediim run %d completed: %d site(s) imputed", fed.run_id, len(fed.active()))
    return json.loads((fed.out / "federation.json").read_text(encoding="utf-8"))
