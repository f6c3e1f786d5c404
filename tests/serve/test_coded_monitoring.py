"""Monitoring counts coded columns: a categorical column's drift is its level frequencies
against the reference (the site's own rows), a binary or categorical cell's monitored
error whether its imputed level was the true one (their codes have no distance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fediim.deploy.layout import FederationLayout
from fediim.io.schema import load_schema
from fediim.io.table import read_csv
from fediim.serve.monitor import DriftMonitor, QualityMonitor
from fediim.serve.service import ServiceState
from fediim.serve.site import Site
from tests.apps.test_flower_coded import coded_run  # noqa: F401 - the coded federation
from tests.cli.test_mixed_csv import _mixed_csv
from tests.serve.conftest import serving_toml


def _drift(blocks: list[list[int]]) -> DriftMonitor:
    reference = np.array([0.0, 0.5, 0.3, 0.2])
    return DriftMonitor(reference, np.sqrt(reference * (1 - reference)) + (reference == 0),
                        np.full(2, np.nan), window=100, min_rows=50, mean_shift=0.5,
                        min_cells=30, error_ratio=2.0, blocks=blocks,
                        level_names=[None, ["a", "b", "c"]])


def test_a_categorical_column_drifts_by_its_most_moved_level() -> None:
    """Level c goes from 20% to 60% of the rows (1.0 sd of its indicator): the column
    drifts, naming the level; level frequencies as in the reference do not."""
    quality = QualityMonitor(2, fraction=0.0, window=10)
    quiet, moved = _drift([[0], [1, 2, 3]]), _drift([[0], [1, 2, 3]])
    levels = np.repeat(np.eye(3), [50, 30, 20], axis=0)
    quiet.observe(np.column_stack([np.zeros(100), levels]))
    state = quiet.state(quality)
    assert not state.drift and state.mean_shift[1] < 1e-9
    levels = np.repeat(np.eye(3), [20, 20, 60], axis=0)
    moved.observe(np.column_stack([np.zeros(100), levels]))
    state = moved.state(quality)
    assert set(state.drifted) == {1} and "frequency of level 'c'" in state.drifted[1]
    np.testing.assert_allclose(state.mean_shift[1], 0.4 / np.sqrt(0.2 * 0.8))
    assert np.isnan(moved.column_scale[1]) and moved.column_scale[0] == 1.0


def test_a_voted_column_is_scored_by_its_misses() -> None:
    quality = QualityMonitor(2, fraction=1.0, window=10, voted=np.array([False, True]))
    quality.record(np.array([0, 0, 1, 1, 1, 1]), np.array([3.0, -4.0, 0.0, 2.0, -1.0, 0.0]))
    np.testing.assert_allclose(quality.rmse(), [np.sqrt(12.5), np.nan])
    np.testing.assert_allclose(quality.level_error_rate(), [np.nan, 0.5])


def _service(layout: FederationLayout, directory: Path) -> ServiceState:
    site = sorted(layout.sites, key=lambda s: s.site_id)[0]
    return ServiceState(Site.open(serving_toml(site.config, directory, monitor_fraction=1.0)),
                        rng=np.random.default_rng(0))


def test_a_served_coded_site_watches_its_coded_columns(
        coded_run: FederationLayout, tmp_path: Path) -> None:  # noqa: F811
    """Rows like the site's: every column, cp (categorical) too, has a drift statistic
    below the threshold, and sex and cp a level error rate; the same rows with every cp
    set to level 4 (a 3-level move for most rows) drift in cp by that level."""
    schema = load_schema(coded_run.schema)
    _mixed_csv(tmp_path / "today.csv", n=300, seed=23)
    rows = read_csv(tmp_path / "today.csv", schema=schema).values
    cp, sex = schema.column_names.index("cp"), schema.column_names.index("sex")
    state = _service(coded_run, tmp_path / "quiet")
    state.impute(rows)
    drift = state.drift_state()
    assert np.all(np.isfinite(drift.mean_shift)) and not drift.drift, drift
    rmse, level_error_rate, counts = state.monitored()
    assert np.all(np.isnan(rmse[[sex, cp]])) and counts[cp] > 0
    assert 0.0 <= level_error_rate[cp] <= 1.0 and 0.0 <= level_error_rate[sex] <= 1.0
    moved = rows.copy()
    moved[~np.isnan(moved[:, cp]), cp] = 3.0  # the code of level 4
    state = _service(coded_run, tmp_path / "moved")
    state.impute(moved)
    drift = state.drift_state()
    assert cp in drift.drifted and "frequency of level '4'" in drift.drifted[cp], drift
