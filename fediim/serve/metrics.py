"""``/metrics``: the service in Prometheus' text format (prometheus-client).

Counters and the latency histogram are updated per request; everything that is a state
(bank age, budget, monitored error, drift) is read from :class:`ServiceState` at scrape
time by :class:`StateCollector`, so it is never stale. Each service has its own registry.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from fediim.serve.service import ImputeOutcome, ServiceState

__all__ = ["LATENCY_BUCKETS", "ServiceMetrics"]

#: Seconds: fine where single rows land (a few ms), coarse up to large batches.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The service's registry: request counters, the latency histogram and the state."""

    def __init__(self, state: ServiceState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fediim_requests", "Imputation requests by HTTP status",
                                ["status"], registry=self.registry)
        self.rows = Counter("fediim_rows", "Rows received in successful requests",
                            registry=self.registry)
        self.cells = Counter("fediim_cells_imputed", "Cells imputed, by method",
                             ["method"], registry=self.registry)
        self.latency = Histogram("fediim_request_seconds",
                                 "Time to handle an imputation request (server side)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(StateCollector(state))

    def observe(self, status: int, seconds: float, n_rows: int,
                outcome: ImputeOutcome | None) -> None:
        """Count one finished imputation request."""
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        if outcome is not None:
            self.rows.inc(n_rows)
            for method, count in outcome.methods.items():
                self.cells.labels(method=method).inc(count)


def _per_column(name: str, documentation: str, columns: list[str], values: np.ndarray
                ) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["column"])
    for column, value in zip(columns, values, strict=True):
        gauge.add_metric([column], float(value))
    return gauge


class StateCollector(Collector):
    """The service's state, read at every scrape."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state, site = self.state, self.state.site
        signed = site.signed
        info = InfoMetricFamily("fediim_bank", "The verified bank being served")
        info.add_metric([], {"run_id": str(signed.run_id), "key_id": signed.key_id,
                             "saved_at": signed.saved_at.isoformat(),
                             "mode": site.engine.settings.mode})
        yield info
        yield GaugeMetricFamily("fediim_bank_age_seconds", "Seconds since the bank was stored",
                                value=state.bank_age_days() * 86400.0)
        yield GaugeMetricFamily("fediim_bank_max_age_seconds",
                                "The site's max_bank_age_days, in seconds",
                                value=site.config.max_bank_age_days * 86400.0)
        yield GaugeMetricFamily("fediim_bank_stale", "1 when the bank is too old to serve",
                                value=float(state.bank_is_stale()))
        yield from self._budget()
        totals = state.totals()
        yield GaugeMetricFamily("fediim_fallback_ratio",
                                "Share of imputed cells that got the fallback, since start-up",
                                value=totals["fallback_rate"])
        yield GaugeMetricFamily("fediim_plans", "Prepared (features, target) plans",
                                value=float(site.engine.n_plans))
        yield from self._monitoring()

    def _budget(self) -> Iterator[Metric]:
        budget = self.state.budget()
        summary = budget.summary or {}
        nan = float("nan")
        for name, key, text in (
                ("fediim_budget_epsilon_spent", "epsilon_spent", "Epsilon spent (ledger)"),
                ("fediim_budget_epsilon_remaining", "epsilon_remaining",
                 "Epsilon remaining (ledger)"),
                ("fediim_budget_rho_spent", "rho_spent", "rho-zCDP spent (ledger)"),
                ("fediim_budget_rho_remaining", "rho_remaining", "rho-zCDP remaining (ledger)"),
                ("fediim_budget_releases", "releases", "Releases charged to the ledger")):
            yield GaugeMetricFamily(name, text, value=float(summary.get(key, nan)))
        yield GaugeMetricFamily("fediim_budget_ledger_readable",
                                "1 when the site's ledger could be read and verified",
                                value=float(budget.error is None))

    def _monitoring(self) -> Iterator[Metric]:
        state, columns = self.state, self.state.site.columns
        rmse, level_error_rate, counts = state.monitored()
        yield _per_column("fediim_monitored_rmse", "Rolling RMSE of masked-and-imputed "
                          "cells (raw units; NaN before any and for binary and categorical "
                          "columns)", columns, rmse)
        yield _per_column("fediim_monitored_nrmse", "Rolling RMSE over the column's standard "
                          "deviation (the site's own)", columns,
                          rmse / state.drift.column_scale)
        yield _per_column("fediim_monitored_level_error_rate", "Rolling share of masked "
                          "binary or categorical cells imputed with another level (NaN "
                          "before any and for other columns)", columns, level_error_rate)
        yield _per_column("fediim_monitored_cells", "Masked cells in the rolling window",
                          columns, counts)
        drift = state.drift_state()
        yield _per_column("fediim_drift_mean_shift", "|window mean - reference mean| / sd "
                          "(a categorical column's most moved level frequency; NaN before "
                          "drift_min_rows values)", columns, drift.mean_shift)
        yield _per_column("fediim_drift_error_ratio", "Monitored RMSE / validated RMSE",
                          columns, drift.error_ratio)
        yield _per_column("fediim_drift_column", "1 where the column drifted", columns,
                          np.array([c in drift.drifted for c in range(len(columns))], float))
        yield GaugeMetricFamily("fediim_drift", "1 when any column drifted (rejoin a run)",
                                value=float(drift.drift))
