"""Property tests: observed cells kept, every gap filled, row order irrelevant."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fediim.impute.estimator import IIMImputer

CONFIGS = [
    {},  # adaptive ell with the global candidate, scaled
    {"ell": 1, "weights": "uniform", "scale": False},  # kNN
    {"ell": 3},
    {"ell": "n", "scale": False},  # GLR
    {"ell_grid": (1, 2, 4, 9), "include_global": False, "alpha": (1e-3, 1.0)},
]


@st.composite
def incomplete_matrices(draw):
    """Continuous data (no distance ties) with a random NaN mask; >= 2 rows stay complete."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(4, 40))
    m = draw(st.integers(1, 5))
    rate = draw(st.floats(0.05, 0.6))
    n_complete = draw(st.integers(2, n))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, m)) * rng.uniform(0.1, 10, size=m) + rng.normal(0, 5, size=m)
    mask = rng.random((n, m)) < rate
    mask[rng.choice(n, size=n_complete, replace=False)] = False
    X[mask] = np.nan
    return X


PROPS = settings(max_examples=30, deadline=None)


def _imputer(cfg_index, k):
    return IIMImputer(n_neighbors=k, **CONFIGS[cfg_index])


@PROPS
@given(X=incomplete_matrices(), cfg=st.integers(0, len(CONFIGS) - 1), k=st.integers(1, 12))
def test_observed_cells_unchanged_and_no_nan_left(X, cfg, k):
    res = _imputer(cfg, k).fit(X).impute(X)
    obs = ~np.isnan(X)
    assert np.array_equal(res.values[obs].view(np.int64), X[obs].view(np.int64))
    assert np.all(np.isfinite(res.values))
    np.testing.assert_array_equal(res.imputed, ~obs)
    assert np.all(res.uncertainty[~obs] >= 0) and np.all(np.isnan(res.uncertainty[obs]))
    # A mean fallback only where the row has no observed value at all (complete rows exist).
    empty = (~obs).all(axis=1)
    assert set(res.method[~obs & ~empty[:, None]].tolist()) <= {"iim"}
    assert set(res.method[empty].ravel().tolist()) <= {"mean"}


@PROPS
@given(X=incomplete_matrices(), cfg=st.integers(0, len(CONFIGS) - 1), k=st.integers(1, 12),
       perm_seed=st.integers(0, 2**32 - 1))
def test_row_permutation_permutes_output(X, cfg, k, perm_seed):
    perm = np.random.default_rng(perm_seed).permutation(len(X))
    res = _imputer(cfg, k).fit(X).impute(X)
    res_p = _imputer(cfg, k).fit(X[perm]).impute(X[perm])
    np.testing.assert_allclose(res_p.values, res.values[perm], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(res_p.method, res.method[perm])
    np.testing.assert_allclose(res_p.uncertainty, res.uncertainty[perm], rtol=1e-7, atol=1e-9)


@PROPS
@given(X=incomplete_matrices(), k=st.integers(1, 12), uniform=st.booleans())
def test_nearest_neighbour_values_stay_in_observed_range(X, k, uniform):
    # With ell = 1 every candidate is an observed value, so any convex combination is inside
    # the column's observed range.
    weights = "uniform" if uniform else "vote"
    out = IIMImputer(n_neighbors=k, ell=1, weights=weights).fit_transform(X)
    lo, hi = np.nanmin(X, axis=0), np.nanmax(X, axis=0)
    tol = 1e-9 * (1 + np.abs(X[~np.isnan(X)]).max())
    assert np.all(out >= lo - tol) and np.all(out <= hi + tol)
