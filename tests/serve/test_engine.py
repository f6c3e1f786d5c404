"""The serving engine: prepared once, its numbers are site_impute's on the site's own rows,
and a cell the bank cannot impute gets the counted fallback."""

from __future__ import annotations

import numpy as np
import pytest

from fediim.federated import FederatedIIM, ModelBank, site_impute
from fediim.serve.engine import EngineSettings, ServingEngine, all_keys


def _federation(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, ModelBank, list[str]]:
    rng = np.random.default_rng(seed)
    n, m = 4 * 180, 4
    latent = rng.normal(size=(n, 2))
    x = latent @ rng.normal(size=(2, m)) + 0.3 * rng.normal(size=(n, m))
    bounds = np.column_stack([x.min(0) - 1.0, x.max(0) + 1.0])
    missing = x.copy()
    rows = rng.choice(n, 120, replace=False)
    missing[rows, rng.integers(0, m, 120)] = np.nan
    missing[2:12, 1:3] = np.nan  # some rows miss two cells
    missing[:2, :] = np.nan  # and two of site 0 observe nothing
    sites = [missing[i * 180:(i + 1) * 180] for i in range(4)]
    fed = FederatedIIM(epsilon=4.0, bounds=bounds, mode="hybrid", seed=3).fit(sites)
    return sites, bounds, fed.bank_, list(fed.site_ids_)


@pytest.fixture(scope="module")
def federation() -> tuple[list[np.ndarray], np.ndarray, ModelBank, list[str]]:
    return _federation()


@pytest.mark.parametrize("mode", ["hybrid", "federated", "mean", "local"])
def test_the_engine_gives_site_impute_numbers_on_the_sites_own_rows(
        federation: tuple[list[np.ndarray], np.ndarray, ModelBank, list[str]],
        mode: str) -> None:
    sites, bounds, bank, ids = federation
    site = sites[0]
    want = site_impute(site, bank, bounds, mode=mode, site_id=ids[0])  # type: ignore[arg-type]
    engine = ServingEngine(site, bank, bounds, EngineSettings(mode=mode, site_id=ids[0]))  # type: ignore[arg-type]
    got = engine.impute(site)
    np.testing.assert_array_equal(got.imputed, want.imputed)
    nothing_observed = np.isnan(site).all(axis=1)
    if mode != "mean":  # rows observing nothing: the counted fallback instead of "mean"
        assert set(got.method[nothing_observed].ravel()) == {"fallback"}
    compared = got.imputed & ~nothing_observed[:, None]
    assert compared.sum() > 40
    for name in ("values", "uncertainty", "ell", "n_candidates"):
        np.testing.assert_array_equal(getattr(got, name)[compared],
                                      getattr(want, name)[compared], err_msg=name)
    expected = {"hybrid": {"hybrid"}, "federated": {"bank"}, "mean": {"mean"},
                "local": {"iim"}}[mode]
    assert set(got.method[compared]) == expected


def test_warming_every_key_changes_no_number(
        federation: tuple[list[np.ndarray], np.ndarray, ModelBank, list[str]]) -> None:
    sites, bounds, bank, ids = federation
    rows = sites[2][np.isnan(sites[2]).any(axis=1)]
    cold = ServingEngine(sites[1], bank, bounds, EngineSettings(site_id=ids[1]))
    warm = ServingEngine(sites[1], bank, bounds, EngineSettings(site_id=ids[1]))
    assert warm.warm(all_keys(4)) == len(all_keys(4)) == 28
    one_by_one = [warm.impute(row[None, :]).values[0] for row in rows]
    np.testing.assert_array_equal(np.array(one_by_one), cold.impute(rows).values)


def test_fallback_is_the_sites_mean_then_the_banks(
        federation: tuple[list[np.ndarray], np.ndarray, ModelBank, list[str]]) -> None:
    sites, bounds, bank, ids = federation
    site = sites[0].copy()
    site[:, 3] = np.nan  # this site never measures column 3
    engine = ServingEngine(site, bank, bounds, EngineSettings(site_id=ids[0]))
    result = engine.impute(np.full((1, 4), np.nan))
    assert list(result.method[0]) == ["fallback"] * 4
    np.testing.assert_allclose(result.values[0, :3], np.nanmean(site[:, :3], axis=0))
    bank_mean = bank.column_moments()[0][3]
    np.testing.assert_allclose(result.values[0, 3],
                               (bank_mean + 0.5) * (bounds[3, 1] - bounds[3, 0]) + bounds[3, 0])
    assert result.uncertainty[0, 3] == 0.0


def test_a_numerical_failure_on_one_key_falls_back_for_that_key_only(
        federation: tuple[list[np.ndarray], np.ndarray, ModelBank, list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sites, bounds, bank, ids = federation
    engine = ServingEngine(sites[0], bank, bounds, EngineSettings(site_id=ids[0]))
    rows = np.array([[np.nan, 0.1, 0.2, 0.3], [0.1, np.nan, 0.2, 0.3]])
    plan = engine.plan(((1, 2, 3), 0))

    def fail(*_: object) -> None:
        raise np.linalg.LinAlgError("singular")

    monkeypatch.setattr(plan, "estimate", fail)
    result = engine.impute(rows)
    assert result.method[0, 0] == "fallback" and result.method[1, 1] == "hybrid"
    np.testing.assert_allclose(result.values[0, 0], np.nanmean(sites[0][:, 0]))
