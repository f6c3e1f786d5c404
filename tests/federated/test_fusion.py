"""Tests for the hybrid's candidates: the bank's per-query models, the shrinkage fusion,
the leave-own-rows-out bank side, and the choice among them (fediim.federated.fusion and
site_imputation.impute_hybrid)."""

from __future__ import annotations

import numpy as np
import pytest

import fediim.federated.site_imputation as federated
from fediim.federated import FederatedIIM, scale_to_bounds, site_impute
from fediim.federated.bank import BankConfig
from fediim.federated.engines import pattern_models
from fediim.federated.fusion import choose_blend, fusion_predictions, site_coefficients
from fediim.impute import IIMImputer
from fediim.impute.iim import ridge_solve
from tests.federated.spies import spy_bank_counts

LOADINGS = np.array([1.0, 2.0, -1.0, 0.5])
BOUNDS = np.array([[-4.0, 4.0], [-8.0, 8.0], [-4.0, 4.0], [-2.0, 2.0]])
CURVED_BOUNDS = np.array([[-3.0, 3.0]] * 3 + [[-6.0, 9.0]])


def _factor_table(seed: int, n: int) -> np.ndarray:
    """n rows over 4 attributes driven by one latent factor (nearly linear, strongly
    correlated)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1)) * LOADINGS + 0.2 * rng.normal(size=(n, 4))


def _curved_table(rng: np.random.Generator, n: int) -> np.ndarray:
    """A target that bends with its features: a small site cannot learn it alone."""
    features = rng.uniform(-2, 2, size=(n, 3))
    target = (2 * np.sin(1.5 * features[:, 0]) + features[:, 1] ** 2 - features[:, 2]
              + 0.1 * rng.normal(size=n))
    return np.column_stack([features, target])


def _hide(rng: np.random.Generator, x: np.ndarray, rate: float) -> np.ndarray:
    """``rate`` of the rows lose one random attribute."""
    out = x.copy()
    rows = rng.choice(len(x), int(rate * len(x)), replace=False)
    out[rows, rng.integers(0, x.shape[1], len(rows))] = np.nan
    return out


def _rmse(out: np.ndarray, truth: np.ndarray, masked: np.ndarray) -> float:
    hidden = np.isnan(masked)
    return float(np.sqrt(np.mean((out[hidden] - truth[hidden]) ** 2)))


# --------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize(("epsilon", "engine"), [(1.0, "cells"), (np.inf, "cells"),
                                                 (np.inf, "mixture")])
def test_bank_coefficients_are_the_linear_models_the_engines_apply(
        epsilon: float, engine: str) -> None:
    """At each query, intercept + slopes . query is the engine's own estimate."""
    sites = [_factor_table(1, 600), _factor_table(2, 400)]
    bank = FederatedIIM(epsilon=epsilon, bounds=BOUNDS, seed=0).fit(sites).bank_
    queries, _ = scale_to_bounds(_factor_table(3, 50), BOUNDS)
    models = pattern_models(bank, 3, (0, 1, 2), BankConfig(engine=engine))
    coefficients = models.coefficients(queries[:, :3])
    assert coefficients.shape == (50, 4)
    np.testing.assert_allclose(
        coefficients[:, 0] + np.einsum("qf,qf->q", coefficients[:, 1:], queries[:, :3]),
        models.impute(queries[:, :3]).values, atol=1e-12)


def test_site_coefficients_describe_the_same_line_in_the_sites_coordinates() -> None:
    rng = np.random.default_rng(0)
    center, scale = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
    bank_model = rng.normal(size=(6, 3))  # target 3 on features (0, 2), scaled coordinates
    standardized = rng.normal(size=(6, 2))
    scaled = center[[0, 2]] + scale[[0, 2]] * standardized
    local = site_coefficients(bank_model, center, scale, (0, 2), 3)
    in_scaled = bank_model[:, 0] + np.einsum("qf,qf->q", bank_model[:, 1:], scaled)
    in_site = local[:, 0] + np.einsum("qf,qf->q", local[:, 1:], standardized)
    np.testing.assert_allclose(center[3] + scale[3] * in_site, in_scaled)


def test_fusion_runs_from_the_sites_regression_to_the_banks_estimate() -> None:
    """Strength 0: the site's own least-squares regression; a huge strength: the prior's value at
    the query; in between, in between."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 2))
    train = np.column_stack([np.ones(40), features, features @ [1.0, -2.0] + 0.5
                             + 0.1 * rng.normal(size=40)])
    queries = rng.normal(size=(5, 2))
    prior = np.tile([3.0, 0.5, 0.5], (5, 1))
    own, mid, bank = fusion_predictions(train, queries, prior, (0.0, 0.3, 1e9), 0.0)
    phi = ridge_solve(train.T @ train, 0.0)
    np.testing.assert_allclose(own, phi[0] + queries @ phi[1:])
    np.testing.assert_allclose(bank, 3.0 + queries @ [0.5, 0.5], atol=1e-5)
    assert np.all((mid - own) * (bank - own) > 0)  # every estimate moves towards the bank's
    assert np.mean(np.abs(mid - bank)) < np.mean(np.abs(own - bank))


def test_choose_blend_keeps_local_on_ties_and_without_sides() -> None:
    truth = np.linspace(1.0, 3.0, 40)
    side, weights = choose_blend(truth, np.zeros((0, 40)), truth, truth,
                                 federated.BLEND_WEIGHTS)
    np.testing.assert_array_equal(weights, [1.0, 0.0, 0.0])
    side, weights = choose_blend(truth, np.stack([truth, truth]), truth, truth,
                                 federated.BLEND_WEIGHTS)
    assert side == 0
    np.testing.assert_array_equal(weights, [1.0, 0.0, 0.0])
    assert tuple(federated.BLEND_WEIGHTS[0]) == (1.0, 0.0, 0.0)
    np.testing.assert_allclose(federated.BLEND_WEIGHTS.sum(axis=1), 1.0)
    # A side that is right where local is wrong takes the whole weight.
    side, weights = choose_blend(truth + 1.0, np.stack([truth + 2.0, truth]), truth - 5.0,
                                 truth, federated.BLEND_WEIGHTS)
    assert side == 1
    np.testing.assert_array_equal(weights, [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="local only first"):
        choose_blend(truth, np.stack([truth]), truth, truth, federated.BLEND_WEIGHTS[::-1])


def _uninformative_choice(seed: int, n_rows: int = 60
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validation predictions where nothing knows more than local: local is the target's
    conditional mean (the truth is local plus independent noise), each side is local plus
    noise of its own, the site mean a constant."""
    rng = np.random.default_rng(seed)
    local = rng.normal(size=n_rows)
    truth = local + rng.normal(size=n_rows)
    sides = local + 0.5 * rng.normal(size=(7, n_rows))
    return local, sides, np.full(n_rows, truth.mean()), truth


def test_choose_blend_keeps_local_when_the_sides_only_look_better_by_chance() -> None:
    """The winner's curse: among 7 sides x 66 weights on 60 rows, the least in-sample
    error is nearly never local's, though no side carries information (so standard errors
    0 and -inf, no check, leave local in most draws); the out-of-fold check keeps local in
    nearly every draw."""
    left = {-np.inf: 0, 1.0: 0}
    for seed in range(40):
        local, sides, mean, truth = _uninformative_choice(seed)
        for standard_errors in left:
            _, weights = choose_blend(local, sides, mean, truth, federated.BLEND_WEIGHTS,
                                      standard_errors=standard_errors)
            left[standard_errors] += weights[0] < 1.0
    assert left[-np.inf] >= 35
    assert left[1.0] <= 4


def test_choose_blend_takes_an_informative_side_on_enough_rows() -> None:
    rng = np.random.default_rng(3)
    truth = rng.normal(size=200)
    local = truth + rng.normal(size=200)
    sides = np.stack([truth + 2 * rng.normal(size=200), truth + 0.3 * rng.normal(size=200)])
    side, weights = choose_blend(local, sides, np.zeros(200), truth, federated.BLEND_WEIGHTS)
    assert side == 1
    assert weights[1] >= 0.8


def _tied_table(rng: np.random.Generator, n_rows: int, measures_last: bool) -> np.ndarray:
    """Five small-integer columns sharing one factor (many rows equally near a query), and
    a sixth that the site may never measure."""
    base = rng.integers(0, 4, size=(n_rows, 1))
    table = (base + rng.integers(0, 3, size=(n_rows, 6))).astype(float)
    if not measures_last:
        table[:, 5] = np.nan
    return table


TIED_BOUNDS = np.array([[-1.0, 8.0]] * 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hybrid_with_local_only_weights_is_the_local_baseline(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights (1, 0, 0) give the site's own IIMImputer over the columns it observes (the
    ``local`` baseline) to the last bits: the same scaling, so the same neighbours among
    tied rows, the same models and small-pattern blend (standardizing the bank's
    coordinates instead moved these imputations by up to 0.14)."""
    rng = np.random.default_rng(seed)
    small = _hide(rng, _tied_table(rng, 150, measures_last=False), 0.15)
    model = FederatedIIM(epsilon=1.0, bounds=TIED_BOUNDS, mode="federated", seed=0).fit(
        [_hide(rng, _tied_table(rng, 400, measures_last=True), 0.05), small],
        site_ids=["a", "s"])
    monkeypatch.setattr(federated, "choose_blend",
                        lambda local, sides, mean, truth, grid: (0, grid[0]))
    hybrid = site_impute(small, model.bank_, TIED_BOUNDS, mode="hybrid",
                         site_id="s").values
    # The baseline as simulations.baselines.impute_table runs it: the observed columns
    # picked by index (a column-major copy; IIMImputer's sums, and so its ties, follow the
    # memory layout).
    observed = small[:, np.flatnonzero(~np.isnan(small).all(axis=0))]
    local = IIMImputer().fit(observed).transform(observed)
    assert observed.shape[1] == 5 and np.isnan(observed).any()
    np.testing.assert_allclose(hybrid[:, :5], local, rtol=0, atol=1e-12)
    assert np.all(np.isfinite(hybrid[:, 5]))  # the never-measured column: from the bank


def test_hybrid_bank_side_takes_each_validated_row_out_of_its_cell_in_every_tree(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An exact bank of several trees: each fold's bank holds every own cell minus the
    fold's released rows, in each tree, and nothing else changes."""
    x = _factor_table(0, 300)
    model = FederatedIIM(epsilon=np.inf, bounds=BOUNDS, mode="hybrid").fit(
        [x, _factor_table(5, 300)], site_ids=["s", "other"])
    bank = model.bank_
    assert bank.n_trees > 1
    seen = spy_bank_counts(monkeypatch)
    rows, _ = scale_to_bounds(x, BOUNDS)
    coefficients = federated.crossfitted_bank_coefficients(
        bank, "s", rows, 3, (0, 1, 2), [BankConfig(engine="mixture")])
    assert coefficients.shape == (1, 300, 4)
    assert len(seen) == federated.CROSSFIT_FOLDS
    removed = np.sum([bank.counts - counts for counts in seen], axis=0)
    np.testing.assert_allclose(removed.sum(), len(x) * bank.n_trees)
    np.testing.assert_allclose(removed[bank.site == "other"], 0.0)
    for tree in range(bank.n_trees):
        np.testing.assert_allclose(removed[(bank.site == "s") & (bank.tree == tree)].sum(),
                                   len(x))


# --------------------------------------------------------------------------- the outcome


def test_small_site_with_an_informative_bank_gains_what_the_bank_offers() -> None:
    """80 rows of a curved relation, two sites of 1,500 exact: local IIM cannot learn it
    on 80 rows, the bank can; the hybrid takes the bank's gain (measured: local 1.02,
    bank-only 0.758, hybrid 0.755)."""
    rng = np.random.default_rng(2)
    big = [_curved_table(rng, 1500), _curved_table(rng, 1500)]
    small = _curved_table(rng, 80)
    masked = _hide(rng, small, 0.3)
    model = FederatedIIM(epsilon=np.inf, bounds=CURVED_BOUNDS, mode="federated", seed=2).fit(
        [_hide(rng, b, 0.05) for b in big] + [masked], site_ids=["a", "b", "small"])
    error = {mode: _rmse(site_impute(masked, model.bank_, CURVED_BOUNDS, mode=mode,
                                     site_id="small").values, small, masked)
             for mode in ("local", "federated", "hybrid")}
    assert error["federated"] < 0.8 * error["local"]
    assert error["hybrid"] < 0.8 * error["local"]
    assert error["hybrid"] <= 1.03 * error["federated"]


def test_large_site_with_a_noise_only_bank_stays_with_its_own_rows() -> None:
    """2,000 rows, the bank at ε = 0.02 (noise: bank-only is 3-4x worse than local): the
    hybrid does not lose to local (measured: local 0.2683, bank-only 1.042, hybrid
    0.2637)."""
    truth = _factor_table(1, 2000)
    masked = _hide(np.random.default_rng(1), truth, 0.1)
    other = _hide(np.random.default_rng(1), _factor_table(101, 2000), 0.05)
    model = FederatedIIM(epsilon=0.02, bounds=BOUNDS, mode="federated", seed=1).fit(
        [other, masked], site_ids=["a", "s"])
    error = {mode: _rmse(site_impute(masked, model.bank_, BOUNDS, mode=mode,
                                     site_id="s").values, truth, masked)
             for mode in ("local", "federated", "hybrid")}
    assert error["federated"] > 3 * error["local"]
    assert error["hybrid"] <= 1.01 * error["local"]
