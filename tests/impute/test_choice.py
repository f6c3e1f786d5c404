"""The engine's validated choices beyond ell: quadratic models and the per-pattern blend."""

import numpy as np
import pytest

from fediim import IIMImputer
from fediim.impute import basis, pattern_choice
from fediim.impute.iim import IIMConfig, PatternModels


def _ridge(design, y, alpha):
    return np.linalg.solve(design.T @ design + alpha * np.eye(design.shape[1]), design.T @ y)


def _quadratic_pattern(n=400, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, 2))
    target = feats[:, 0] ** 2 - feats[:, 0] * feats[:, 1] + rng.normal(0, 0.05, n)
    return feats, target


def test_quadratic_terms_and_when_a_pattern_offers_them():
    feats = np.array([[1.0, 2.0], [3.0, -1.0]])
    np.testing.assert_array_equal(basis.quadratic_terms(feats), [[1, 2, 4], [9, -3, 1]])
    wide = np.arange(12.0).reshape(2, 6)  # beyond FULL_MAX_FEATURES: squares only
    np.testing.assert_array_equal(basis.quadratic_terms(wide), wide**2)
    width = 1 + 2 + 3
    assert basis.offers_quadratic(10 * width, 2) and not basis.offers_quadratic(10 * width - 1, 2)


def test_quadratic_candidates_equal_ridge_from_scratch():
    feats, target = _quadratic_pattern()
    grid = (1, 5, 30, 60)
    pm = PatternModels(feats, target, IIMConfig(ell_grid=grid, alpha=1e-3, quadratic=True))
    labels = pm.candidate_labels()
    # width 6: quadratic models from ell >= 4 * 6 = 24, after the linear one of each ell.
    assert labels == [(1, 1e-3), (5, 1e-3), (30, 1e-3), (30, 1e-3), (60, 1e-3), (60, 1e-3),
                      (0, 1e-3)]
    rows = np.array([3, 150])
    cands = pm.candidates(rows)
    d2 = ((feats[:, None] - feats[None]) ** 2).sum(axis=2)
    design = np.column_stack([np.ones(len(feats)), feats, basis.quadratic_terms(feats)])
    for r, row in enumerate(rows):
        order = np.argsort(d2[row], kind="stable")
        for column, ell in ((3, 30), (5, 60)):
            ref = _ridge(design[order[:ell]], target[order[:ell]], 1e-3)
            np.testing.assert_allclose(cands.models[r, column], ref, rtol=1e-7, atol=1e-8)
        linear = _ridge(design[order[:30], :3], target[order[:30]], 1e-3)
        np.testing.assert_allclose(cands.models[r, 2], np.r_[linear, 0, 0, 0], atol=1e-8)


def test_quadratic_models_win_on_a_quadratic_surface():
    feats, target = _quadratic_pattern()
    queries = np.random.default_rng(1).normal(size=(50, 2))
    truth = queries[:, 0] ** 2 - queries[:, 0] * queries[:, 1]
    errors = {}
    for quadratic in (False, True):
        pm = PatternModels(feats, target, IIMConfig(quadratic=quadratic))
        errors[quadratic] = np.sqrt(np.mean((pm.impute(queries).values - truth) ** 2))
    assert errors[True] < 0.5 * errors[False]


def test_global_held_out_prediction_is_the_refit_without_the_row():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 3))
    target = feats @ [1.0, 0.5, -1.0] + rng.normal(0, 0.3, 40)
    pm = PatternModels(feats, target, IIMConfig())
    predictions, alpha = pattern_choice.held_out_predictions(pm, np.arange(40))
    design = np.column_stack([np.ones(40), feats])
    for row in (0, 17, 39):
        keep = np.arange(40) != row
        ref = design[row] @ _ridge(design[keep], target[keep], alpha)
        np.testing.assert_allclose(predictions[1, row], ref, rtol=1e-9)
        np.testing.assert_allclose(predictions[2, row], target[keep].mean(), rtol=1e-12)


@pytest.mark.parametrize("signal", [0.0, 1.0])
def test_blend_leaves_iim_only_without_signal(signal):
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(40, 8))
    target = signal * feats[:, 0] + rng.normal(0, 0.5, 40)
    blend = PatternModels(feats, target, IIMConfig(blend=True)).blend
    assert abs(sum(blend.weights) - 1.0) < 1e-12
    if signal:
        assert blend.weights[2] <= 0.2  # the feature explains the target: little mean
    else:  # pure noise: mostly the mean or a heavily penalised global model
        assert blend.weights[0] <= 0.2


def test_no_blend_on_large_patterns_or_without_adaptive_ell():
    feats, target = _quadratic_pattern(n=pattern_choice.MAX_CHOICE_ROWS + 1)
    assert PatternModels(feats, target, IIMConfig(blend=True)).blend.iim_only
    assert PatternModels(feats[:40], target[:40], IIMConfig(ell=3, blend=True)).blend.iim_only
    assert PatternModels(feats[:40], target[:40], IIMConfig(blend=False)).blend.iim_only


def test_blended_imputation_never_worse_than_the_mean_on_noise():
    rng = np.random.default_rng(5)
    table = rng.normal(size=(60, 10))
    lost = rng.random(table.shape) < 0.08
    masked = np.where(lost, np.nan, table)
    error = {}
    for blend in (False, True):
        imputed = IIMImputer(blend=blend).fit_transform(masked)
        error[blend] = np.sqrt(np.mean((imputed - table)[lost] ** 2))
    column_mean = np.where(lost, np.nanmean(masked, axis=0), table)
    assert error[True] < error[False]
    assert error[True] <= 1.05 * np.sqrt(np.mean((column_mean - table)[lost] ** 2))


def test_ties_within_tolerance_go_to_the_first():
    costs = np.array([[1.0 + 1e-13, 1.0, 2.0], [3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(pattern_choice.first_least(costs), [0, 2])


def test_blended_candidates_vote_to_the_blend_and_feed_the_draws():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(40, 8))
    pm = PatternModels(feats, rng.normal(0, 0.5, 40), IIMConfig(blend=True, quadratic=True))
    assert not pm.blend.iim_only
    found = pm.impute(rng.normal(size=(5, 8)))
    np.testing.assert_allclose((found.weights * found.candidates).sum(axis=1), found.values,
                               rtol=1e-12, atol=1e-12)
    table = rng.normal(size=(60, 10))
    masked = np.where(rng.random(table.shape) < 0.08, np.nan, table)
    draws = IIMImputer(blend=True, quadratic=True, n_imputations=2,
                       random_state=0).fit(masked).multiple_imputations(masked)
    assert len(draws) == 2 and all(np.isfinite(draw).all() for draw in draws)
    assert not np.array_equal(draws[0], draws[1])
