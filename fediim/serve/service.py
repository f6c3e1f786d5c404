"""The running service's state, without the web framework: the prepared site, what one
request does (impute, count, monitor), and the snapshot the metrics and the status page
read. Nothing here logs or keeps a row beyond the monitors' rolling windows."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fediim.io.result import METHOD_FALLBACK, ImputationResult
from fediim.serve.engine import Key, all_keys
from fediim.serve.monitor import DriftMonitor, DriftState, QualityMonitor
from fediim.serve.site import BudgetView, Site, count_methods, fallback_rate, read_budget

__all__ = ["ImputeOutcome", "ServiceState", "startup_keys"]

log = logging.getLogger(__name__)

#: The column kinds whose cells are a voted level (scored by misses, not distance).
VOTED_KINDS = ("binary", "categorical")
#: Requests kept for the status page's rate and latency (the most recent).
_RECENT = 2048
#: The status page's request rate is over this many seconds.
RATE_WINDOW_SECONDS = 60.0
#: Drift changes are looked for (and logged) at most this often.
DRIFT_CHECK_SECONDS = 1.0


def startup_keys(site: Site) -> list[Key]:
    """The keys whose plans are made at start-up: all of them when there are at most
    ``warm_keys``, else those with one missing cell (what monitoring uses) and those of
    the site's own incomplete rows."""
    n_columns = site.engine.n_columns  # the encoded columns, with coded columns
    every = all_keys(n_columns)
    if len(every) <= site.config.serve.warm_keys:
        return every
    keys = {(tuple(c for c in range(n_columns) if c != t), t) for t in range(n_columns)}
    missing = site.engine.site.missing
    for pattern in np.unique(missing[missing.any(axis=1)], axis=0):
        features = tuple(int(c) for c in np.flatnonzero(~pattern))
        keys.update((features, int(t)) for t in np.flatnonzero(pattern) if features)
    return sorted(keys)


@dataclass(frozen=True)
class ImputeOutcome:
    """One request's imputation and its counts, and the multiple-imputation draws it
    asked for (none by default)."""

    result: ImputationResult
    methods: dict[str, int]
    draws: list[ImputationResult] = field(default_factory=list)

    @property
    def fallback_rate(self) -> float:
        """Share of this request's imputed cells that got the fallback."""
        return fallback_rate(self.methods)


@dataclass
class _Totals:
    requests: int = 0
    refused: int = 0
    rows: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=_RECENT))


class ServiceState:
    """Everything ``fediim serve`` holds between requests.

    ``clock`` gives the current time (tests move it); ``rng`` draws the monitored cells.
    """

    def __init__(self, site: Site, *, clock: Callable[[], datetime] | None = None,
                 rng: np.random.Generator | None = None) -> None:
        self.site = site
        self.clock = clock or (lambda: datetime.now(UTC))
        self.started_at = self.clock()
        settings = site.config.serve
        started = time.perf_counter()
        self.n_plans = site.engine.warm(startup_keys(site))
        self.startup_seconds = time.perf_counter() - started
        voted = np.array([spec.kind in VOTED_KINDS for spec in site.schema.columns], bool)
        self.quality = QualityMonitor(len(site.columns), settings.monitor_fraction,
                                      settings.monitor_window, rng, voted=voted)
        reference_mean, reference_sd = site.drift_reference()
        self.drift = DriftMonitor(reference_mean, reference_sd, site.baseline_rmse(),
                                  window=settings.drift_window, min_rows=settings.drift_min_rows,
                                  mean_shift=settings.drift_mean_shift,
                                  min_cells=settings.drift_min_cells,
                                  error_ratio=settings.drift_error_ratio,
                                  blocks=site.drift_blocks(), level_names=site.level_names())
        self._totals = _Totals()
        self._lock = threading.Lock()
        self._monitor_lock = threading.Lock()
        self._draw_lock = threading.Lock()
        self._variance: np.ndarray | None = None
        self._drifted: set[int] = set()
        self._drift_checked = -float("inf")

    # -- requests ------------------------------------------------------------------
    def impute(self, x: np.ndarray, n_draws: int = 0) -> ImputeOutcome:
        """Impute a request's rows (and, with ``n_draws``, draw that many completed copies
        of them from the bank: :meth:`~fediim.serve.site.Site.impute_multiple`, fresh
        entropy per request, no budget spent), count them, and feed the monitors. A
        ValueError when the site cannot draw (``local`` mode with coded columns)."""
        result = self.site.impute(x)
        draws = (self.site.impute_multiple(x, n_draws, np.random.default_rng(),
                                           self._draw_variance()) if n_draws else [])
        outcome = ImputeOutcome(result=result, methods=count_methods(result), draws=draws)
        self._monitor(x)
        return outcome

    def _draw_variance(self) -> np.ndarray | None:
        """The draws' residual variance, measured on the first request for draws (it
        reads only the site's rows and the bank) and kept."""
        with self._draw_lock:
            if self._variance is None:
                self._variance = self.site.draw_variance(np.random.default_rng())
            return self._variance

    def _monitor(self, x: np.ndarray) -> None:
        """Score masked cells of the complete rows and update the drift windows."""
        with self._monitor_lock:
            self._monitor_locked(x)

    def _monitor_locked(self, x: np.ndarray) -> None:
        rows, columns = self.quality.choose(x)
        if len(rows):
            imputable = np.array([self.site.schema.column(self.site.columns[c]).impute
                                  for c in columns], dtype=bool)
            rows, columns = rows[imputable], columns[imputable]
        if len(rows):
            masked = x[rows].copy()
            truth = masked[np.arange(len(rows)), columns]
            masked[np.arange(len(rows)), columns] = np.nan
            imputed = self.site.impute(masked).values[np.arange(len(rows)), columns]
            self.quality.record(columns, imputed - truth)
        self.drift.observe(self.site.engine_rows(x))

    def record(self, outcome: ImputeOutcome | None, n_rows: int, seconds: float) -> None:
        """Count a finished request (``outcome`` None: refused) for the status page."""
        with self._lock:
            totals = self._totals
            totals.requests += 1
            totals.refused += outcome is None
            totals.rows += n_rows
            totals.recent.append((time.monotonic(), seconds))
            for method, count in (outcome.methods if outcome else {}).items():
                totals.methods[method] = totals.methods.get(method, 0) + count
        self._log_drift_changes()

    def _log_drift_changes(self) -> None:
        """Log a column that starts or stops drifting (checked at most every
        :data:`DRIFT_CHECK_SECONDS`: the check reads every window)."""
        now = time.monotonic()
        with self._lock:
            if now - self._drift_checked < DRIFT_CHECK_SECONDS:
                return
            self._drift_checked = now
        state = self.drift_state()
        drifted = set(state.drifted)
        with self._lock:
            new, gone, self._drifted = drifted - self._drifted, self._drifted - drifted, drifted
        for column in sorted(new):  # aggregates only: never a value of a row
            log.warning("drift in column %s: %s; the site should join a new federation run",
                        self.site.columns[column], state.drifted[column])
        for column in sorted(gone):
            log.info("column %s no longer drifts", self.site.columns[column])

    # -- reading -------------------------------------------------------------------
    def drift_state(self) -> DriftState:
        """The drift state now."""
        with self._monitor_lock:
            return self.drift.state(self.quality)

    def monitored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per column, the rolling RMSE (raw units; numeric and ordinal columns), the
        level error rate (binary and categorical ones) and how many masked cells they are
        over."""
        with self._monitor_lock:
            return (self.quality.rmse(), self.quality.level_error_rate(),
                    self.quality.counts())

    def totals(self) -> dict[str, Any]:
        """Requests (and how many were refused), rows, cells by method and the fallback
        rate since start-up."""
        with self._lock:
            methods = dict(self._totals.methods)
            return {"requests": self._totals.requests, "refused": self._totals.refused,
                    "rows": self._totals.rows,
                    "cells": methods, "cells_imputed": sum(methods.values()),
                    "fallback_cells": methods.get(METHOD_FALLBACK, 0),
                    "fallback_rate": fallback_rate(methods)}

    def recent_traffic(self) -> dict[str, float]:
        """Request rate over the last minute and latency quantiles of recent requests."""
        now = time.monotonic()
        with self._lock:
            recent = list(self._totals.recent)
        in_window = [s for t, s in recent if now - t <= RATE_WINDOW_SECONDS]
        latencies = np.array([s for _, s in recent])
        quantile = (lambda q: float(np.quantile(latencies, q)) * 1000) if len(latencies) \
            else (lambda q: float("nan"))
        return {"requests_per_second": len(in_window) / RATE_WINDOW_SECONDS,
                "latency_p50_ms": quantile(0.5), "latency_p99_ms": quantile(0.99),
                "latency_samples": float(len(latencies))}

    def budget(self) -> BudgetView:
        """The site's budget from its ledger (read only)."""
        return read_budget(self.site.config)

    def bank_age_days(self) -> float:
        """Days since the bank was stored."""
        return self.site.bank_age_days(self.clock())

    def bank_is_stale(self) -> bool:
        """Whether the bank is now older than ``max_bank_age_days``."""
        return self.site.bank_is_stale(self.clock())
