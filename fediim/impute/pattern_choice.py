"""Blend, per (target, features) pattern, IIM with the global model and the mean.

IIM's individual models are chosen by validation, but the chosen ones are judged on the
same few tuples that chose them: where training rows are few (a small, wide, gappy table)
that optimism can make the vote worse than a global regression or even the column mean.
So a pattern with few training rows first predicts each of them held out, three ways:

* IIM: training row t_j is imputed by the vote of its k nearest *other* rows' models, each
  chosen as Alg. 3 would without t_j among its validation tuples (t_j validated each of
  them: keeping it flatters IIM most where it fits noise), and its error on t_j taken as
  its exact ridge leave-one-out residual where t_j is one of its learning tuples;
* the global ridge model, its penalty chosen from :data:`GLOBAL_PENALTIES` (times the row
  count) by the exact leave-one-out residuals ``e / (1 - h)``;
* the mean of the other rows;

and imputes with the convex blend of the three, on a grid of step :data:`BLEND_STEP`, that
errs least on them (ties: more weight on IIM, then on the global model). Patterns with more
than :data:`MAX_CHOICE_ROWS` training rows impute with IIM alone: there each row's model is
validated on enough tuples, and the check would learn the models of nearly every row,
several times the work of imputing.

With ``config.trees`` a pattern of at least :data:`~fediim.impute.tree_models.MIN_TREE_ROWS`
training rows, whatever its size, also offers two global tree ensembles, cross-fitted on
the same validation rows (:mod:`fediim.impute.tree_models`): the blend is then over five
parts, and the engine imputes with the trees only as far as their held-out predictions of
the pattern's own rows earn it.
"""

from __future__ import annotations

from itertools import product
from typing import Any, Protocol

import numpy as np

from fediim.impute.tree_models import MIN_TREE_ROWS, TreeStack, fit_tree_stack
from fediim.impute.voting import vote_weights

__all__ = ["BLEND_STEP", "GLOBAL_PENALTIES", "MAX_CHOICE_ROWS", "Blend", "choose_blend",
           "first_least", "held_out_predictions"]

#: Patterns with more training rows than this impute with IIM alone.
MAX_CHOICE_ROWS = 500
#: Most validation rows a pattern's choice looks at.
SAMPLE_ROWS = 500
#: Candidate ridge penalties of the global model, per training row.
GLOBAL_PENALTIES = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
#: Grid step of the blend weights.
BLEND_STEP = 0.1
#: Errors this close (relatively) are ties, so that the order of the rows (float sums)
#: cannot flip a choice.
TIE_TOLERANCE = 1e-9


class PatternLike(Protocol):
    """What the blend reads of :class:`fediim.impute.iim.PatternModels`."""

    n_rows: int
    features: np.ndarray
    target: np.ndarray
    config: Any

    def nearest_others_of(self, rows: np.ndarray, k: int) -> np.ndarray: ...
    def learn(self, rows: np.ndarray) -> tuple[Any, np.ndarray]: ...
    def pair_errors(self, validated: np.ndarray, owner: np.ndarray, candidates: Any
                    ) -> np.ndarray: ...
    def validation_costs(self, rows: np.ndarray, candidates: Any
                         ) -> tuple[np.ndarray, np.ndarray]: ...
    def global_model(self, alpha: float) -> tuple[np.ndarray, np.ndarray]: ...
    def augmented(self, rows: np.ndarray) -> np.ndarray: ...


class Blend:
    """Weights of (IIM, global model, mean[, boosted trees, randomized trees]), the global
    model's ridge penalty, and the tree ensembles when they have weight."""

    def __init__(self, weights: tuple[float, ...], global_alpha: float,
                 trees: TreeStack | None = None) -> None:
        self.weights = weights
        self.global_alpha = global_alpha
        self.trees = trees

    @property
    def iim_only(self) -> bool:
        """Whether the pattern imputes with IIM alone."""
        return self.weights[0] == 1.0 and not any(self.weights[1:])


#: IIM alone, as the engine imputes without the check.
IIM_ONLY = Blend((1.0, 0.0, 0.0), 0.0)


def blend_grid(parts: int = 3) -> np.ndarray:
    """Every convex weight vector over ``parts`` parts on the grid, most weight on IIM
    first, then on the global model, and so on (the tie order), shape (points, parts)."""
    steps = np.arange(0.0, 1.0 + BLEND_STEP / 2, BLEND_STEP)
    points = [(1.0 - sum(rest), *rest) for rest in product(steps, repeat=parts - 1)
              if sum(rest) <= 1.0 + 1e-9]
    points.sort(key=lambda point: tuple(-weight for weight in point))
    return np.round(np.asarray(points), 10)


def offers_trees(models: PatternLike) -> bool:
    """Whether the pattern weighs tree ensembles too (``config.trees``, enough rows)."""
    return bool(getattr(models.config, "trees", False)) and models.n_rows >= MIN_TREE_ROWS


def choose_blend(models: PatternLike) -> Blend:
    """The blend whose held-out predictions of the training rows err least (IIM alone
    with fewer than three rows, or more than :data:`MAX_CHOICE_ROWS` without trees)."""
    trees = offers_trees(models)
    if models.n_rows < 3 or (models.n_rows > MAX_CHOICE_ROWS and not trees):
        return IIM_ONLY
    rows = choice_rows(models.n_rows)
    predictions, alpha = held_out_predictions(models, rows)
    stack = fit_tree_stack(models.features, models.target, rows) if trees else None
    if stack is not None:
        predictions = np.concatenate([predictions, stack.held_out])
    grid = blend_grid(len(predictions))
    errors = ((grid @ predictions - models.target[rows]) ** 2).sum(axis=1)
    weights = tuple(float(weight) for weight in grid[int(first_least(errors))])
    return Blend(weights, alpha, stack if any(weights[3:]) else None)


def choice_rows(n_rows: int) -> np.ndarray:
    """The validation rows of a pattern: all up to :data:`SAMPLE_ROWS`, else an evenly
    spaced sample of that many (deterministic, so imputation is too)."""
    if n_rows <= SAMPLE_ROWS:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, SAMPLE_ROWS).round().astype(np.intp))


def first_least(errors: np.ndarray) -> np.ndarray:
    """Along the last axis, the first position whose error ties with the least (within
    :data:`TIE_TOLERANCE`, so float noise from the row order cannot flip a choice)."""
    least = errors.min(axis=-1, keepdims=True)
    return np.argmax(errors <= least + TIE_TOLERANCE * np.abs(least), axis=-1)


def held_out_predictions(models: PatternLike, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Each way's prediction of the training ``rows``, each without itself, shape
    (3, len(rows)), as (IIM, global model, mean); and the global model's chosen penalty."""
    global_predictions, alpha = _global_held_out(models, rows)
    return np.stack([_iim_held_out(models, rows), global_predictions,
                     _mean_held_out(models.target, rows)]), alpha


def _iim_held_out(models: PatternLike, rows: np.ndarray) -> np.ndarray:
    """The vote of each row's k nearest other rows' models, each model chosen as Alg. 3
    would without this row among its validation tuples, and its error on the row taken as
    its leave-one-out residual where the row is one of its learning tuples."""
    nearest = models.nearest_others_of(rows, min(models.config.n_neighbors,
                                                 models.n_rows - 1))
    owners, position = np.unique(nearest, return_inverse=True)
    candidates, best = models.learn(owners)
    cost, n_validated = models.validation_costs(owners, candidates)
    position = position.ravel()
    validated = np.repeat(rows, nearest.shape[1])
    errors = models.pair_errors(validated, position, candidates)
    # The row validated every one of its k nearest (and only once): take it out.
    chosen = first_least(cost[position] - errors**2)
    alone = n_validated[position] <= 1
    chosen[alone] = best[position[alone]]  # validated by no other row: the default
    predictions = (models.target[validated] - errors[np.arange(len(validated)), chosen])
    predictions = predictions.reshape(nearest.shape)
    weights = vote_weights(predictions, models.config.weights)
    return (weights * predictions).sum(axis=1)


def _global_held_out(models: PatternLike, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """The global ridge model's exact leave-one-out prediction of each row, at the
    penalty of :data:`GLOBAL_PENALTIES` whose predictions err least."""
    best: tuple[float, np.ndarray, float] | None = None
    x_rows = models.augmented(rows)
    for penalty in GLOBAL_PENALTIES:
        alpha = max(penalty * models.n_rows, float(models.config.alphas().min()))
        phi, inverse = models.global_model(alpha)
        leverage = np.einsum("rf,fg,rg->r", x_rows, inverse, x_rows)
        residual = (models.target[rows] - x_rows @ phi) / np.maximum(1.0 - leverage, 1e-3)
        error = float((residual**2).sum())
        if best is None or error < best[0] - TIE_TOLERANCE * abs(best[0]):
            best = (error, models.target[rows] - residual, alpha)
    assert best is not None
    return best[1], best[2]


def _mean_held_out(target: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The mean of the other training rows' targets."""
    return (target.sum() - target[rows]) / (len(target) - 1)
