"""Multiple imputation from the bank: re-noised banks, residual noise, FederatedIIM draws."""

from __future__ import annotations

import numpy as np
import pytest

from fediim import FederatedIIM
from fediim.federated.bank import ModelBank
from fediim.federated.gram import affine_map, augmented_gram, transform_gram, upper_triangle
from fediim.federated.multiple import renoised_bank, site_residual_variance

BOUNDS = np.array([[0.0, 100.0], [0.0, 200.0], [0.0, 100.0]])


def hospital(n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """age, 2 age + noise, age / 2 + noise; the second column hidden in a fifth of rows."""
    age = rng.uniform(20, 80, n_rows)
    table = np.column_stack([age, 2 * age + rng.normal(0, 8, n_rows),
                             0.5 * age + rng.normal(0, 4, n_rows)])
    table[rng.random(n_rows) < 0.2, 1] = np.nan
    return table


def _well_conditioned_bank(n_cells: int, sigma: float) -> ModelBank:
    """Cells of 500 spread records each: a noise of ``sigma`` leaves them PSD."""
    rng = np.random.default_rng(0)
    lo = rng.uniform(-0.5, 0.0, (n_cells, 2))
    hi = lo + 0.5
    grams = np.stack([augmented_gram(rng.uniform(low, high, (500, 2)))
                      for low, high in zip(lo, hi, strict=True)])
    return ModelBank(n_features=2, site=np.full(n_cells, "a"),
                     cell=np.array([f"a:{n}" for n in range(n_cells)]), lo=lo, hi=hi,
                     gram=grams, sigma=np.full(n_cells, sigma))


def test_renoised_bank_adds_the_release_noise_in_cell_coordinates() -> None:
    bank = _well_conditioned_bank(300, sigma=2.0)
    renoised = renoised_bank(bank, np.random.default_rng(1))
    to_cell = affine_map(0.5 * (bank.lo + bank.hi), bank.hi - bank.lo)
    change = upper_triangle(transform_gram(renoised.gram - bank.gram, to_cell))
    assert np.std(change) == pytest.approx(2.0, rel=0.05)
    assert abs(np.mean(change)) < 0.1
    assert np.allclose(renoised.gram, np.swapaxes(renoised.gram, 1, 2))
    assert renoised.gram is not bank.gram and np.array_equal(renoised.lo, bank.lo)


def test_an_exact_bank_is_not_renoised() -> None:
    bank = _well_conditioned_bank(3, sigma=0.0)
    assert renoised_bank(bank, np.random.default_rng(0)) is bank


def test_residual_variance_measures_the_site_own_imputation_error() -> None:
    rng = np.random.default_rng(2)
    sites = [hospital(400, rng), hospital(300, rng)]
    model = FederatedIIM(epsilon=np.inf, bounds=BOUNDS, mode="federated").fit(sites)
    variance = site_residual_variance(sites[0], model.bank_, BOUNDS, mode="federated",
                                      n_neighbors=10, site_id="site0", random_state=0,
                                      rng=np.random.default_rng(0))
    # age from the other two (~3.6 sd), column 1 with noise sd 8, column 2 with sd 4.
    assert np.sqrt(variance) == pytest.approx([3.6, 8.0, 4.0], rel=0.35)


@pytest.mark.parametrize("mode", ["hybrid", "federated", "local"])
def test_federated_draws_keep_observed_cells_and_stay_in_bounds(mode: str) -> None:
    rng = np.random.default_rng(3)
    sites = [hospital(300, rng), hospital(200, rng)]
    model = FederatedIIM(epsilon=4.0, bounds=BOUNDS, mode=mode, seed=0, n_imputations=3)
    drawn = model.fit(sites).multiple_imputations(sites)
    assert len(drawn) == 3 and all(len(federation) == 2 for federation in drawn)
    for federation in drawn:
        for table, source in zip(federation, sites, strict=True):
            observed = ~np.isnan(source)
            assert np.array_equal(table[observed], source[observed])
            assert np.all((table >= BOUNDS[:, 0]) & (table <= BOUNDS[:, 1]))
    holes = np.isnan(sites[0])
    assert not np.allclose(drawn[0][0][holes], drawn[1][0][holes])


def test_bank_noise_widens_the_draws() -> None:
    """The same sites: draws from a noised bank spread more than from an exact one."""
    rng = np.random.default_rng(4)
    sites = [hospital(150, rng), hospital(150, rng)]
    holes = np.isnan(sites[0])

    def between_draws(epsilon: float) -> float:
        model = FederatedIIM(epsilon=epsilon, bounds=BOUNDS, mode="federated", seed=1,
                             n_imputations=8, random_state=0).fit(sites)
        draws = np.stack([federation[0][holes] for federation in
                          model.multiple_imputations(sites)])
        return float(np.mean(np.var(draws, axis=0)))

    assert between_draws(0.5) > 1.5 * between_draws(np.inf)


def test_n_imputations_is_checked() -> None:
    rng = np.random.default_rng(5)
    sites = [hospital(50, rng), hospital(50, rng)]
    with pytest.raises(ValueError, match="n_imputations"):
        FederatedIIM(epsilon=np.inf, n_imputations=0).fit(sites)
    model = FederatedIIM(epsilon=np.inf).fit(sites)
    with pytest.raises(ValueError, match="n_imputations"):
        model.set_params(n_imputations=1.5).multiple_imputations(sites)


#: A 3-level category (labels 1..3), a binary flag and an ordinal grade beside the age.
CODED_KINDS = {1: ("categorical", (1.0, 2.0, 3.0)), 2: ("binary", (0.0, 1.0)),
               3: ("ordinal", (1.0, 2.0, 3.0))}
CODED_BOUNDS = np.array([[0.0, 100.0], [1.0, 3.0], [0.0, 1.0], [1.0, 3.0]])


def coded_hospital(n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """age and three codes that follow it, the codes hidden in a fifth of the rows (one
    missingness pattern keeps the federated imputation quick)."""
    age = rng.uniform(20, 80, n_rows)
    stage = 1.0 + (age + rng.normal(0, 8, n_rows) > 40) + (age > 60)
    flag = (age + rng.normal(0, 15, n_rows) > 50).astype(float)
    grade = np.clip(np.round((age - 20) / 20 + rng.normal(0, 0.4, n_rows)), 1, 3)
    table = np.column_stack([age, stage, flag, grade])
    table[rng.random(n_rows) < 0.2, 1:] = np.nan
    return table


@pytest.mark.parametrize(("aggregation", "mode"), [("secure", "federated"),
                                                   ("per-site", "local")])
def test_federated_coded_draws_are_declared_levels(aggregation: str, mode: str) -> None:
    """Every drawn coded cell is one of its column's declared labels (not a code, never
    numeric noise), observed cells stay, and the draws differ."""
    rng = np.random.default_rng(6)
    sites = [coded_hospital(70, rng) for _ in range(3)]
    model = FederatedIIM(epsilon=4.0, bounds=CODED_BOUNDS, mode=mode, seed=0,
                         column_kinds=CODED_KINDS, aggregation=aggregation, n_imputations=2)
    drawn = model.fit(sites).multiple_imputations(sites)
    for federation in drawn:
        for table, source in zip(federation, sites, strict=True):
            observed = ~np.isnan(source)
            assert np.array_equal(table[observed], source[observed])
            for column, (_, levels) in CODED_KINDS.items():
                assert np.isin(table[:, column], levels).all()
    holes = np.isnan(sites[0])
    assert not np.array_equal(drawn[0][0][holes], drawn[1][0][holes])
