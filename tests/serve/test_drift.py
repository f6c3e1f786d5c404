"""Drift: rows from another distribution raise the drift state within N requests (stated
below); rows from the bank's own distribution do not, however many arrive.

Requests carry 10 rows each, every complete row monitored (``monitor_fraction = 1``), the
default thresholds (mean shift 0.5 sd after 50 observed values; monitored RMSE 2x the validated
one after 30 cells per column).
"""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from fediim.serve.monitor import DriftMonitor, QualityMonitor, RollingWindow
from fediim.serve.service import ServiceState
from tests.serve.conftest import json_rows, new_rows

#: A mean shift of one standard deviation is flagged within this many requests (50
#: observed values of the column are needed first: 10% of the cells are missing).
N_MEAN_SHIFT = 6
#: Broken relationships (one column shuffled across rows: same means, useless features)
#: are flagged within this many requests.
N_ERROR_RISE = 25
#: Rows like the bank's never raise drift over this many requests.
N_QUIET = 60
ROWS_PER_REQUEST = 10


def _requests_until_drift(state: ServiceState, client: TestClient, rows: list[np.ndarray]
                          ) -> int | None:
    for number, x in enumerate(rows, start=1):
        assert client.post("/v1/impute", json=json_rows(x)).status_code == 200
        if state.drift_state().drift:
            return number
    return None


def test_rows_like_the_banks_raise_no_drift(service: tuple[ServiceState, TestClient]) -> None:
    state, client = service
    rows = [new_rows(100 + i, ROWS_PER_REQUEST) for i in range(N_QUIET)]
    assert _requests_until_drift(state, client, rows) is None
    drift = state.drift_state()
    assert np.all(drift.mean_shift < 0.3), drift.mean_shift
    assert np.all(np.isfinite(drift.error_ratio)) and np.all(drift.error_ratio < 1.6)


def test_a_mean_shift_raises_drift_within_n_requests(
        service: tuple[ServiceState, TestClient]) -> None:
    state, client = service
    age_sd = state.drift.scale[0]
    rows = [new_rows(200 + i, ROWS_PER_REQUEST, shift=(age_sd, 0.0, 0.0, 0.0))
            for i in range(N_MEAN_SHIFT)]
    found = _requests_until_drift(state, client, rows)
    assert found is not None and found <= N_MEAN_SHIFT, state.drift_state()
    assert set(state.drift_state().drifted) == {0}
    assert "mean moved" in state.drift_state().drifted[0]


def test_broken_relationships_raise_drift_by_the_monitored_error(
        service: tuple[ServiceState, TestClient]) -> None:
    state, client = service
    rng = np.random.default_rng(5)
    rows = []
    for i in range(N_ERROR_RISE):
        x = new_rows(300 + i, ROWS_PER_REQUEST)
        x[:, 2] = rng.permutation(x[:, 2])  # chol no longer follows the others
        rows.append(x)
    found = _requests_until_drift(state, client, rows)
    drift = state.drift_state()
    assert found is not None and found <= N_ERROR_RISE, drift
    assert set(drift.drifted) == {2} and "monitored error" in drift.drifted[2]
    assert np.all(drift.mean_shift < 0.5)


def test_rolling_window_keeps_the_last_values() -> None:
    window = RollingWindow(2, 4)
    window.add(0, np.arange(6.0))
    window.add(1, np.array([1.0]))
    np.testing.assert_array_equal(window.counts(), [4, 1])
    np.testing.assert_allclose(window.means(), [3.5, 1.0])


def test_drift_needs_enough_rows_before_judging() -> None:
    quality = QualityMonitor(2, fraction=0.0, window=10)
    drift = DriftMonitor(np.zeros(2), np.ones(2), np.full(2, np.nan), window=100, min_rows=50,
                         mean_shift=0.5, min_cells=30, error_ratio=2.0)
    drift.observe(np.full((49, 2), 3.0))
    assert not drift.state(quality).drift
    drift.observe(np.full((1, 2), 3.0))
    assert set(drift.state(quality).drifted) == {0, 1}
