"""Rubin's rules in fediim.mi.pool, against numbers worked out by hand."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy import stats

import fediim.mi
from fediim.mi import pool

ESTIMATES = [1.0, 1.2, 0.8, 1.1, 0.9]
VARIANCES = [0.04, 0.04, 0.04, 0.04, 0.04]


def test_hand_computed_example_with_barnard_rubin_degrees_of_freedom() -> None:
    # Q-bar = 1; deviations 0, .2, -.2, .1, -.1 -> B = 0.10 / 4 = 0.025; U-bar = 0.04;
    # T = 0.04 + 1.2 * 0.025 = 0.07; lambda = 0.03 / 0.07 = 3/7; r = 0.03 / 0.04 = 0.75.
    # df_old = 4 / (3/7)^2 = 196/9; df_obs = (101/103) * 100 * (4/7);
    # df = 1 / (9/196 + 1/df_obs) = 15.6826...
    pooled = pool(ESTIMATES, VARIANCES, df_complete=100)
    assert pooled.estimate == pytest.approx(1.0)
    assert pooled.within == pytest.approx(0.04)
    assert pooled.between == pytest.approx(0.025)
    assert pooled.total == pytest.approx(0.07)
    assert pooled.lambda_ == pytest.approx(3 / 7)
    assert pooled.riv == pytest.approx(0.75)
    df_observed = 101 / 103 * 100 * 4 / 7
    assert pooled.df == pytest.approx(1 / (9 / 196 + 1 / df_observed))
    assert pooled.df == pytest.approx(15.6826, abs=1e-4)
    assert pooled.fmi == pytest.approx((0.75 + 2 / (pooled.df + 3)) / 1.75)
    half = stats.t.ppf(0.975, pooled.df) * np.sqrt(0.07)
    assert pooled.interval() == pytest.approx((1 - half, 1 + half))
    assert pooled.interval() == pytest.approx((0.4382, 1.5618), abs=1e-4)


def test_large_sample_degrees_of_freedom_without_complete_data_df() -> None:
    pooled = pool(ESTIMATES, VARIANCES)
    assert pooled.df == pytest.approx(196 / 9)
    assert pooled.std_error == pytest.approx(np.sqrt(0.07))


def test_identical_estimates_reduce_to_the_complete_data_interval() -> None:
    """No between-imputation variance: the interval is the complete-data t interval."""
    pooled = pool([2.0, 2.0, 2.0], [0.25, 0.25, 0.25], df_complete=30)
    assert pooled.between == 0 and pooled.total == pytest.approx(0.25)
    # lambda = 0: df_obs = (31/33) * 30, the Barnard-Rubin value at no missingness.
    assert pooled.df == pytest.approx(31 / 33 * 30)
    low, high = pooled.interval(0.9)
    assert high - 2.0 == pytest.approx(stats.t.ppf(0.95, 31 / 33 * 30) * 0.5)
    assert low == pytest.approx(4.0 - high)


def test_barnard_rubin_never_exceeds_either_part() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        estimates = rng.normal(size=5)
        pooled = pool(estimates, rng.uniform(0.1, 1.0, size=5), df_complete=40)
        assert 0 < pooled.df <= 40
        assert pooled.df <= 4 / pooled.lambda_**2


@pytest.mark.parametrize(("estimates", "variances", "df_complete", "message"), [
    ([1.0], [0.1], None, "M >= 2"),
    ([1.0, 2.0], [0.1], None, "as many variances"),
    ([1.0, np.nan], [0.1, 0.1], None, "finite"),
    ([1.0, 2.0], [0.1, -0.1], None, ">= 0"),
    ([1.0, 2.0], [0.1, 0.1], 0, "df_complete"),
])
def test_bad_inputs_are_refused(estimates: list[float], variances: list[float],
                                df_complete: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pool(estimates, variances, df_complete=df_complete)


def test_interval_level_is_checked() -> None:
    with pytest.raises(ValueError, match="level"):
        pool(ESTIMATES, VARIANCES).interval(1.5)


def test_docstring_example_runs() -> None:
    failed, attempted = doctest.testmod(fediim.mi, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failed == 0
