"""Multiple imputation from a site's bank between runs: on the site's own rows the draws
are in-process ``FederatedIIM``'s (``site_draws``), and they spread where a single
imputation does not."""

from __future__ import annotations

import numpy as np
import pytest

from fediim.federated import ModelBank
from fediim.federated.multiple import site_draws
from fediim.serve.draws import bank_draws
from fediim.serve.engine import EngineSettings, ServingEngine
from tests.serve.test_engine import _federation

Federation = tuple[list[np.ndarray], np.ndarray, ModelBank, list[str]]


@pytest.fixture(scope="module")
def federation() -> Federation:
    return _federation()


@pytest.mark.parametrize("mode", ["hybrid", "federated", "local"])
def test_draws_on_the_sites_own_rows_are_the_in_process_draws(federation: Federation,
                                                              mode: str) -> None:
    sites, bounds, bank, ids = federation
    site = sites[0]
    want = site_draws(site, bank, bounds, 2, mode=mode, n_neighbors=10,  # type: ignore[arg-type]
                      site_id=ids[0], random_state=0, rng=np.random.default_rng(11))
    settings = EngineSettings(mode=mode, site_id=ids[0])  # type: ignore[arg-type]
    got = bank_draws(site, site, bank, bounds, settings, 2, np.random.default_rng(11))
    compared = want[0].imputed & ~np.isnan(site).all(axis=1)[:, None]
    assert compared.sum() > 40
    for drawn, expected in zip(got, want, strict=True):
        np.testing.assert_array_equal(drawn.imputed, expected.imputed)
        np.testing.assert_array_equal(drawn.values[compared], expected.values[compared])
    assert not np.array_equal(got[0].values[compared], got[1].values[compared])


def test_draws_of_new_rows_keep_observed_cells_and_spread_around_the_estimate(
        federation: Federation) -> None:
    sites, bounds, bank, ids = federation
    reference, rows = sites[1], sites[3][np.isnan(sites[3]).any(axis=1)]
    settings = EngineSettings(mode="hybrid", site_id=ids[1])
    single = ServingEngine(reference, bank, bounds, settings).impute(rows)
    draws = bank_draws(reference, rows, bank, bounds, settings, 16, np.random.default_rng(5))
    values = np.stack([d.values for d in draws])
    observed = ~np.isnan(rows)
    for drawn in draws:
        np.testing.assert_array_equal(drawn.imputed, single.imputed)
        np.testing.assert_array_equal(drawn.values[observed], rows[observed])
    cells = single.imputed
    assert np.all((values[:, cells] >= bounds[np.nonzero(cells)[1], 0])
                  & (values[:, cells] <= bounds[np.nonzero(cells)[1], 1]))
    spread = values[:, cells].std(axis=0)
    assert np.all(spread > 0)
    # centred on the single imputation: the draws' mean is within a few standard errors
    error = (values[:, cells].mean(axis=0) - single.values[cells]) / (spread / np.sqrt(16))
    assert np.median(np.abs(error)) < 2.0


def test_draws_are_reproducible_and_refuse_no_imputations(federation: Federation) -> None:
    sites, bounds, bank, ids = federation
    settings = EngineSettings(mode="federated", site_id=ids[2])
    first = bank_draws(sites[2], sites[0], bank, bounds, settings, 2, np.random.default_rng(3))
    again = bank_draws(sites[2], sites[0], bank, bounds, settings, 2, np.random.default_rng(3))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.values, b.values)
    with pytest.raises(ValueError, match="n_imputations"):
        bank_draws(sites[2], sites[0], bank, bounds, settings, 0, np.random.default_rng(3))
