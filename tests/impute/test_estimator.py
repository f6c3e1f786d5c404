"""IIMImputer: the scikit-learn contract, provenance, fallbacks and input validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from fediim.impute.estimator import IIMImputer, ImputationResult, knn_imputer
from fediim.impute.iim import IIMConfig, PatternModels


# All of scikit-learn's estimator checks pass: no expected_failed_checks are needed.
@parametrize_with_checks([IIMImputer(), IIMImputer(ell=1, weights="uniform", scale=False)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _data(seed=0, n=60, m=4, rate=0.15):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, m)) * rng.uniform(0.5, 4, size=m) + rng.normal(0, 5, size=m)
    X[:, -1] += 2.0 * X[:, 0]
    mask = rng.random((n, m)) < rate
    mask[: n // 3] = False  # a third of the rows stays complete
    X[mask] = np.nan
    return X


def test_dataframe_in_dataframe_out():
    X = _data(1)
    cols = ["age", "chol", "bp", "hr"]
    index = pd.Index([f"p{i}" for i in range(len(X))][::-1], name="patient")
    df = pd.DataFrame(X, columns=cols, index=index)
    imp = IIMImputer()
    out = imp.fit_transform(df)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == cols
    assert out.index.equals(df.index) and out.index.name == "patient"
    assert not out.isna().any().any()
    assert list(imp.feature_names_in_) == cols
    assert list(imp.get_feature_names_out()) == cols
    out2 = imp.transform(df)
    assert isinstance(out2, pd.DataFrame) and out2.index.equals(df.index)
    np.testing.assert_array_equal(out.to_numpy(), out2.to_numpy())
    # Same numbers as the ndarray route; ndarray in, ndarray out.
    arr = IIMImputer().fit_transform(X)
    assert isinstance(arr, np.ndarray)
    np.testing.assert_allclose(out.to_numpy(), arr, rtol=1e-12)


def test_observed_cells_bit_identical_and_input_untouched():
    X = _data(2)
    X[0, 0] = -0.0
    X[1, 1] = 1e-300
    X[2, 2] = 3.141592653589793e15
    X[3, 3] = 0.1 + 0.2
    X[40, 1] = np.nan  # a row that needs imputing too
    before = X.copy()
    out = IIMImputer().fit_transform(X)  # scale=True: a scale round trip would show
    obs = ~np.isnan(X)
    assert np.array_equal(out[obs].view(np.int64), X[obs].view(np.int64))
    assert np.array_equal(X, before, equal_nan=True)
    assert np.all(np.isfinite(out))


def test_rows_with_several_missing_cells_use_their_pattern():
    X = _data(3, n=80, m=5, rate=0.0)
    X[60, [1, 3]] = np.nan
    X[61, [0, 2, 4]] = np.nan
    X[62, [0, 1, 2, 3]] = np.nan
    X[63, 2] = np.nan
    imp = IIMImputer(n_neighbors=5, scale=False)
    res = imp.fit(X).impute(X)
    for r in (60, 61, 62, 63):
        feats = np.flatnonzero(~np.isnan(X[r]))
        for a in np.flatnonzero(np.isnan(X[r])):
            train = np.flatnonzero(~np.isnan(X[:, list(feats) + [a]]).any(axis=1))
            pm = PatternModels(X[np.ix_(train, feats)], X[train, a],
                               IIMConfig(n_neighbors=5, alpha=1e-3))
            ref = pm.impute(X[r, feats][None, :]).values[0]
            np.testing.assert_allclose(res.values[r, a], ref, rtol=1e-12)
            assert res.method[r, a] == "iim"
    assert res.imputed.sum() == 2 + 3 + 4 + 1


def test_row_with_every_value_missing_gets_column_means():
    X = _data(4)
    X[5] = np.nan
    res = IIMImputer().fit(X).impute(X)
    np.testing.assert_allclose(res.values[5], np.nanmean(X, axis=0), rtol=1e-12)
    assert list(res.method[5]) == ["mean"] * X.shape[1]
    np.testing.assert_array_equal(res.uncertainty[5], 0.0)
    np.testing.assert_array_equal(res.n_candidates[5], 0)
    # Also in a matrix imputed after fitting.
    new = np.full((2, X.shape[1]), np.nan)
    new[1, 0] = 1.0
    out = IIMImputer().fit(X).transform(new)
    np.testing.assert_allclose(out[0], np.nanmean(X, axis=0), rtol=1e-12)
    assert np.isfinite(out[1]).all() and out[1, 0] == 1.0


def test_target_without_training_row_falls_back_to_mean():
    # Columns a and b are never observed together: no row can train a model for b from a.
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 3))
    X[:15, 1] = np.nan
    X[15:, 0] = np.nan
    query = np.array([[0.3, np.nan, 0.1], [np.nan, 0.2, 0.5]])
    imp = IIMImputer(n_neighbors=3).fit(X)
    res = imp.impute(query)
    assert res.values[0, 1] == pytest.approx(np.nanmean(X[:, 1]), rel=1e-12)
    assert res.values[1, 0] == pytest.approx(np.nanmean(X[:, 0]), rel=1e-12)
    assert res.method[0, 1] == "mean" and res.method[1, 0] == "mean"
    assert res.uncertainty[0, 1] == 0.0 and np.isnan(res.ell[0, 1])
    # Whereas a target with training rows is imputed by IIM.
    res2 = imp.impute(np.array([[np.nan, 1.0, 0.4]]))
    assert res2.method[0, 0] == "mean"  # still no row with a and b
    res3 = imp.impute(np.array([[0.3, 1.0, np.nan]]))
    assert res3.method[0, 2] == "mean"  # no row has a, b and c
    res4 = imp.impute(np.array([[0.3, np.nan, np.nan]]))
    assert res4.method[0, 2] == "iim" and res4.method[0, 1] == "mean"


def test_uncertainty_nonnegative_where_imputed_nan_elsewhere():
    X = _data(6, rate=0.3)
    res = IIMImputer().fit(X).impute(X)
    miss = np.isnan(X)
    assert isinstance(res, ImputationResult)
    assert np.all(res.uncertainty[miss] >= 0)
    assert np.all(np.isnan(res.uncertainty[~miss]))
    assert np.any(res.uncertainty[miss] > 0)


def test_uncertainty_is_weighted_spread_of_candidates():
    # kNN (ell = 1, uniform): candidates are the k neighbours' values; spread = their std.
    X = np.column_stack([np.arange(10.0), np.arange(10.0) ** 2])
    X = np.vstack([X, [4.4, np.nan]])
    res = knn_imputer(n_neighbors=3, scale=False).fit(X).impute(X)
    neighbours = np.array([16.0, 25.0, 9.0])  # x = 4, 5, 3
    assert res.values[10, 1] == pytest.approx(neighbours.mean(), rel=1e-12)
    assert res.uncertainty[10, 1] == pytest.approx(neighbours.std(), rel=1e-12)


def test_impute_method_codes_and_provenance():
    X = _data(7, n=50, m=3, rate=0.2)
    X[3] = np.nan
    res = IIMImputer(n_neighbors=4, ell=3).fit(X).impute(X)
    miss = np.isnan(X)
    np.testing.assert_array_equal(res.imputed, miss)
    assert set(res.method[~miss]) == {""}
    empty = miss.all(axis=1)
    assert empty[3] and set(res.method[empty].ravel()) == {"mean"}
    iim_cells = miss & ~empty[:, None]  # every pattern here has complete training rows
    assert iim_cells.any() and set(res.method[iim_cells]) == {"iim"}
    np.testing.assert_array_equal(res.n_candidates[iim_cells], 4)
    np.testing.assert_array_equal(res.n_candidates[~miss], 0)
    np.testing.assert_array_equal(res.ell[iim_cells], 3.0)
    assert np.all(np.isnan(res.ell[~miss]))
    # The global model is reported as ell 0.
    glr = IIMImputer(ell="n").fit(X).impute(X)
    np.testing.assert_array_equal(glr.ell[iim_cells], 0.0)


def test_fit_once_transform_many_equals_fresh_fit():
    A = _data(8, n=90, m=4, rate=0.2)
    rng = np.random.default_rng(9)
    batches = []
    for _ in range(3):
        B = rng.normal(size=(25, 4)) * np.nanstd(A, axis=0) + np.nanmean(A, axis=0)
        B[rng.random(B.shape) < 0.3] = np.nan
        batches.append(B)
    batches.append(batches[0])  # repeat: cached models must give the same answer
    shared = IIMImputer(n_neighbors=5).fit(A)
    for B in batches:
        fresh = IIMImputer(n_neighbors=5).fit(A).transform(B)
        np.testing.assert_allclose(shared.transform(B), fresh, rtol=1e-10, atol=1e-10)
    # Transforming the training matrix after other batches equals fit_transform.
    np.testing.assert_allclose(shared.transform(A), IIMImputer(n_neighbors=5).fit_transform(A),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"n_neighbors": 2.5}, "n_neighbors"),
        ({"ell": 0}, "ell"),
        ({"ell": "big"}, "ell"),
        ({"weights": "x"}, "weights"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": (0.1, -1.0)}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
    ],
)
def test_invalid_params_raise(params, match):
    with pytest.raises(ValueError, match=match):
        IIMImputer(**params).fit(_data(10))


def test_all_nan_column_raises_naming_it():
    X = _data(11)
    X[:, 2] = np.nan
    df = pd.DataFrame(X, columns=["age", "chol", "bp", "hr"])
    with pytest.raises(ValueError, match="bp") as info:
        IIMImputer().fit(df)
    assert "chol" not in str(info.value)
    with pytest.raises(ValueError, match="x2"):
        IIMImputer().fit(X)


def test_transform_with_wrong_columns_raises():
    X = _data(12)
    imp = IIMImputer().fit(X)
    with pytest.raises(ValueError, match="features"):
        imp.transform(X[:, :3])
    with pytest.raises(ValueError, match="features"):
        imp.transform(np.column_stack([X, X[:, 0]]))
    df = pd.DataFrame(X, columns=list("abcd"))
    imp_df = IIMImputer().fit(df)
    with pytest.raises(ValueError):
        imp_df.transform(df.rename(columns={"d": "z"}))


def test_transform_before_fit_raises():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        IIMImputer().transform(_data(13))


@pytest.mark.parametrize("params", [{"ell_grid": (0, 3)}, {"ell_grid": ()}, {"ell": True}])
def test_invalid_ell_settings_rejected_at_fit(params):
    X = np.random.default_rng(0).normal(size=(30, 3))
    X[0, 1] = np.nan
    with pytest.raises(ValueError, match="ell"):
        IIMImputer(**params).fit(X)
