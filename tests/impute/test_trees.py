"""The validated stack of IIM with global tree ensembles (fediim.impute.tree_models)."""

import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesRegressor, HistGradientBoostingRegressor

from fediim import IIMImputer
from fediim.impute import pattern_choice, tree_models
from fediim.impute.iim import IIMConfig, PatternModels


def _step_table(n=600, seed=0):
    """Column 2 is a step function of columns 0 and 1: local planes fit it badly."""
    rng = np.random.default_rng(seed)
    feats = rng.uniform(-1, 1, size=(n, 2))
    target = np.where(feats[:, 0] > 0.1, 2.0, -1.0) * np.where(feats[:, 1] > -0.3, 1.0, 0.5)
    return feats, target + rng.normal(0, 0.05, n)


def test_held_out_predictions_come_from_ensembles_that_never_saw_the_row():
    feats, target = _step_table(n=150)
    rows = np.arange(0, 150, 2)
    stack = tree_models.fit_tree_stack(feats, target, rows)
    assert len(stack.folds) == tree_models.TREE_FOLDS
    for fold in range(tree_models.TREE_FOLDS):
        out = np.arange(fold, len(rows), tree_models.TREE_FOLDS)
        learn = np.ones(150, dtype=bool)
        learn[rows[out]] = False
        boosted = HistGradientBoostingRegressor(random_state=tree_models.TREE_SEED,
                                                early_stopping=False)
        forest = ExtraTreesRegressor(n_estimators=tree_models.TREES_PER_FOLD,
                                     random_state=tree_models.TREE_SEED)
        for part, model in enumerate((boosted, forest)):
            reference = model.fit(feats[learn], target[learn]).predict(feats[rows[out]])
            np.testing.assert_allclose(stack.held_out[part, out], reference, rtol=1e-12)
    averaged = stack.predict(feats[:5])
    by_fold = [[model.predict(feats[:5]) for model in fold] for fold in stack.folds]
    np.testing.assert_allclose(averaged, np.mean(by_fold, axis=0), rtol=1e-12)


def test_trees_win_the_blend_on_a_step_surface_and_impute_it_better():
    feats, target = _step_table()
    models = PatternModels(feats, target, IIMConfig(trees=True))
    blend = models.blend
    assert blend.trees is not None and sum(blend.weights[3:]) >= 0.5
    queries, truth = _step_table(n=200, seed=1)
    error = {}
    for trees in (False, True):
        imputed = PatternModels(feats, target, IIMConfig(trees=trees)).impute(queries).values
        error[trees] = np.sqrt(np.mean((imputed - truth) ** 2))
    assert error[True] < 0.7 * error[False]


def test_trees_earn_little_on_a_plane():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(400, 3))
    target = feats @ [1.0, -0.5, 0.25] + rng.normal(0, 0.05, 400)
    blend = PatternModels(feats, target, IIMConfig(trees=True)).blend
    assert sum(blend.weights[3:]) <= 0.2


def test_small_patterns_and_trees_off_keep_three_parts():
    feats, target = _step_table(n=tree_models.MIN_TREE_ROWS - 1)
    assert len(PatternModels(feats, target, IIMConfig(trees=True)).blend.weights) == 3
    feats, target = _step_table(n=pattern_choice.MAX_CHOICE_ROWS + 1)
    assert PatternModels(feats, target, IIMConfig(trees=False)).blend.iim_only
    assert not PatternModels(feats, target, IIMConfig(trees=True)).blend.iim_only


def test_imputer_stacks_trees_when_asked_and_validates_the_flag():
    feats, target = _step_table()
    table = np.column_stack([feats, target])
    masked = table.copy()
    lost = np.arange(0, 600, 10)
    masked[lost, 2] = np.nan
    error = {}
    for trees in (False, True):
        imputed = IIMImputer(trees=trees).fit_transform(masked)
        error[trees] = np.sqrt(np.mean((imputed[lost, 2] - table[lost, 2]) ** 2))
    assert IIMImputer().get_params()["trees"] is False
    assert error[True] < 0.7 * error[False]
    with pytest.raises(ValueError, match="trees must be a bool"):
        IIMImputer(trees="yes").fit(masked)


def test_stacked_values_do_not_depend_on_the_batch_and_feed_the_draws():
    feats, target = _step_table()
    models = PatternModels(feats, target, IIMConfig(trees=True))
    queries = _step_table(n=20, seed=3)[0]
    batch = models.impute(queries)
    alone = models.impute(queries[7:8])
    np.testing.assert_allclose(alone.values, batch.values[7:8], rtol=1e-12)
    # each blended candidate carries the same non-IIM parts, so the vote is the value
    voted = (batch.weights * batch.candidates).sum(axis=1)
    np.testing.assert_allclose(voted, batch.values, rtol=1e-9, atol=1e-12)
