"""Multiple imputation with IIMImputer: draws from the predictive distribution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fediim import IIMImputer
from fediim.impute.iim import IIMConfig, PatternModels
from fediim.impute.multiple import resampled_rows

NOISE_SD = 0.5


def linear_table(n_rows: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(truth, masked): y = x1 + x2 + N(0, 0.5^2), y hidden in a quarter of the rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, 2))
    truth = np.column_stack([x, x.sum(axis=1) + rng.normal(0, NOISE_SD, n_rows)])
    masked = truth.copy()
    masked[rng.random(n_rows) < 0.25, 2] = np.nan
    return truth, masked


def test_draws_keep_observed_cells_and_vary_the_imputed_ones() -> None:
    _, masked = linear_table()
    tables = IIMImputer(n_imputations=4, random_state=0).fit(masked).multiple_imputations(
        masked)
    observed = ~np.isnan(masked)
    assert len(tables) == 4
    for table in tables:
        assert np.array_equal(table[observed], masked[observed])
        assert np.all(np.isfinite(table))
    holes = np.isnan(masked)
    assert not np.allclose(tables[0][holes], tables[1][holes])


def test_draws_spread_like_the_noise_around_the_single_imputation() -> None:
    """Each draw departs from the best estimate by about the residual noise, and from
    the truth by about sqrt(2) times it (the truth carries its own noise)."""
    truth, masked = linear_table(n_rows=800)
    imputer = IIMImputer(n_imputations=5, random_state=1).fit(masked)
    single = imputer.transform(masked)
    holes = np.isnan(masked)
    draws = np.stack([table[holes] for table in imputer.multiple_imputations(masked)])
    from_single = np.std(draws - single[holes])
    from_truth = np.sqrt(np.mean((draws - truth[holes]) ** 2))
    assert from_single == pytest.approx(NOISE_SD, rel=0.2)
    assert from_truth == pytest.approx(NOISE_SD * np.sqrt(2), rel=0.2)


def test_an_int_random_state_repeats_the_draws_and_another_changes_them() -> None:
    _, masked = linear_table()
    first = IIMImputer(n_imputations=2, random_state=3).fit(masked).multiple_imputations(masked)
    again = IIMImputer(n_imputations=2, random_state=3).fit(masked).multiple_imputations(masked)
    other = IIMImputer(n_imputations=2, random_state=4).fit(masked).multiple_imputations(masked)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_n_imputations_leaves_the_single_imputation_alone() -> None:
    _, masked = linear_table()
    plain = IIMImputer().fit_transform(masked)
    assert np.array_equal(IIMImputer(n_imputations=7, random_state=0).fit_transform(masked),
                          plain)


def test_dataframes_in_dataframes_out() -> None:
    _, masked = linear_table(n_rows=100)
    frame = pd.DataFrame(masked, columns=["a", "b", "y"])
    tables = IIMImputer(n_imputations=2, random_state=0).fit(frame).multiple_imputations(frame)
    assert [list(table.columns) for table in tables] == [["a", "b", "y"]] * 2


def test_a_cell_without_a_model_is_drawn_from_its_column() -> None:
    """A row observing nothing has no model: its draws are observed values of the column."""
    _, masked = linear_table(n_rows=60)
    masked[0] = np.nan
    tables = IIMImputer(n_imputations=3, random_state=0).fit(masked).multiple_imputations(
        masked)
    for table in tables:
        for column in range(3):
            assert np.isclose(masked[1:, column], table[0, column]).any()


@pytest.mark.parametrize(("params", "message"), [
    ({"n_imputations": 0}, "n_imputations"), ({"n_imputations": 2.5}, "n_imputations"),
    ({"n_imputations": True}, "n_imputations"), ({"random_state": -1}, "random_state"),
    ({"random_state": "seed"}, "random_state"),
])
def test_parameters_are_checked_at_fit(params: dict[str, object], message: str) -> None:
    _, masked = linear_table(n_rows=30)
    with pytest.raises(ValueError, match=message):
        IIMImputer(**params).fit(masked)  # type: ignore[arg-type]


def test_a_generator_is_a_valid_random_state() -> None:
    _, masked = linear_table(n_rows=50)
    imputer = IIMImputer(n_imputations=2, random_state=np.random.default_rng(0))
    assert len(imputer.fit(masked).multiple_imputations(masked)) == 2


def test_validation_mse_of_the_global_model_is_the_noise_variance() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(600, 2))
    target = features.sum(axis=1) + rng.normal(0, NOISE_SD, 600)
    models = PatternModels(features, target, IIMConfig(ell="n"))
    mse = models.validation_mse(np.arange(600))
    assert mse.shape == (600,)
    assert float(np.mean(mse)) == pytest.approx(NOISE_SD**2, rel=0.15)


def test_resampled_rows() -> None:
    rng = np.random.default_rng(0)
    half = resampled_rows(101, "half", rng)
    assert len(half) == 50 and len(np.unique(half)) == 50
    bootstrap = resampled_rows(100, "bootstrap", rng)
    assert len(bootstrap) == 100 and len(np.unique(bootstrap)) < 100
    assert np.array_equal(resampled_rows(5, "none", rng), np.arange(5))
    with pytest.raises(ValueError, match="posterior"):
        resampled_rows(5, "jackknife", rng)  # type: ignore[arg-type]
