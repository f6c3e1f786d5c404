"""A bank that breaks the numerics never breaks a site's imputation: the site's own IIM
fills the affected cells, marked ``fallback``, whatever the site's data."""

from __future__ import annotations

import numpy as np
import pytest

import fediim.federated.site_imputation as site_imputation
from fediim.federated import FederatedIIM, ModelBank, site_impute
from fediim.io.result import METHOD_FALLBACK

BOUNDS = np.array([[0.0, 10.0], [-5.0, 5.0], [0.0, 100.0]])


def _table(seed: int, n: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(1, 9, n)
    x = np.column_stack([a, rng.normal(0, 1, n), 10 * a + rng.normal(0, 3, n)])
    x[rng.choice(n, 30, replace=False), 2] = np.nan
    return x


def _bank() -> ModelBank:
    fed = FederatedIIM(epsilon=4.0, bounds=BOUNDS, seed=1)
    return fed.fit([_table(1), _table(2)]).bank_


def _poisoned(bank: ModelBank) -> ModelBank:
    gram = bank.gram.copy()
    gram[:, 1:, :] = gram[:, :, 1:] = np.nan  # every moment but the counts
    out = bank.select(np.ones(bank.n_cells, dtype=bool))
    object.__setattr__(out, "gram", gram)
    return out


@pytest.mark.parametrize("mode", ["hybrid", "federated", "mean"])
def test_a_nan_bank_falls_back_to_local_iim(mode: str) -> None:
    x = _table(0)
    result = site_impute(x, _poisoned(_bank()), BOUNDS, mode=mode, site_id="site9")
    assert np.all(np.isfinite(result.values)) and np.all(result.imputed == np.isnan(x))
    if mode != "hybrid":  # hybrid may also weigh the federation out by itself
        assert np.all(result.method[result.imputed] == METHOD_FALLBACK)


@pytest.mark.parametrize("mode", ["hybrid", "federated"])
def test_a_linear_algebra_failure_falls_back_per_job(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def singular(*args: object, **kwargs: object) -> None:
        raise np.linalg.LinAlgError("Matrix is not positive definite")

    monkeypatch.setattr(site_imputation, "pattern_models", singular)
    x = _table(0)
    result = site_impute(x, _bank(), BOUNDS, mode=mode, site_id="site9")
    assert np.all(np.isfinite(result.values))
    assert set(result.method[result.imputed]) == {METHOD_FALLBACK}
    local = site_impute(x, None, BOUNDS, mode="local")
    np.testing.assert_array_equal(result.values, local.values)


def test_an_honest_bank_uses_no_fallback() -> None:
    result = site_impute(_table(0), _bank(), BOUNDS, site_id="site9")
    assert METHOD_FALLBACK not in set(result.method[result.imputed])
