"""Shrinkage fusion of a site's own rows with the bank's models, and the hybrid's choice.

The fusion is the site's own ridge regression of the target on F with a prior centred at
the bank's model: ``phi = (U + lambda I)^-1 (V + lambda phi_fed)``, ``U, V`` the site's
Gram over its training rows. It is solved per query, in coordinates centred at the query
and with ``phi_fed`` the linear model the bank applies there (see
:meth:`~fediim.federated.engines.CellPatternModels.coefficients`), so that the penalty
weighs the estimate at the query and the slopes alike: ``lambda -> 0`` gives the site's
own linear regression, ``lambda -> inf`` the bank's estimate. Everything works in the
site's standardized coordinates (see :class:`~fediim.federated.site_imputation.SiteView`).
"""

from __future__ import annotations

import numpy as np

from fediim.federated.gram import affine_map, transform_gram

__all__ = ["CHOICE_FOLDS", "CHOICE_STANDARD_ERRORS", "FUSION_STRENGTHS", "choice_beats_local",
           "choose_blend", "fusion_predictions", "site_coefficients"]

#: The fusion's prior strengths per training row: ``lambda = strength * n_train``, so the
#: bank's model counts as that share of the site's rows whatever the site's size.
FUSION_STRENGTHS = (0.01, 0.03, 0.1, 0.3, 1.0)
#: How many paired standard errors the hybrid's choice must beat local by, out of fold,
#: for the site to leave local (see :func:`choose_blend`).
CHOICE_STANDARD_ERRORS = 1.0
#: Folds of that out-of-fold check.
CHOICE_FOLDS = 5


def site_coefficients(coefficients: np.ndarray, center: np.ndarray, scale: np.ndarray,
                      features: tuple[int, ...], target: int) -> np.ndarray:
    """Linear models ``y = a + b . x`` in the bank's scaled coordinates, shape (q, f + 1),
    rewritten for the site's standardized ones (``x = center + scale * s``, both affine
    maps of the raw values)."""
    columns = list(features)
    intercept, slopes = coefficients[:, 0], coefficients[:, 1:]
    return np.column_stack([
        (intercept + slopes @ center[columns] - center[target]) / scale[target],
        slopes * scale[columns] / scale[target]])


def fusion_predictions(train: np.ndarray, queries: np.ndarray, prior: np.ndarray,
                       strengths: tuple[float, ...] | np.ndarray, alpha: float
                       ) -> np.ndarray:
    """The fusion's estimate at each query for each prior strength, shape
    (len(strengths), q).

    ``train``: the site's training rows as ``(1, features, target)`` (standardized
    coordinates); ``queries``: the queries on the features; ``prior``: the bank's model at
    each query (:func:`site_coefficients`); ``alpha``: the base ridge penalty.
    """
    n_rows, width = train.shape
    size = width - 1
    # The Gram in coordinates centred at each query (features shifted, target kept).
    origin = np.column_stack([queries, np.zeros(len(queries))])
    centred = transform_gram(train.T @ train, affine_map(origin, np.ones(width - 1)))
    prior_at_query = prior.copy()
    prior_at_query[:, 0] += np.einsum("qf,qf->q", prior[:, 1:], queries)
    estimates = np.empty((len(strengths), len(queries)))
    for number, strength in enumerate(strengths):
        penalty = strength * n_rows
        phi = np.linalg.solve(
            centred[:, :size, :size] + (alpha + penalty) * np.eye(size),
            (centred[:, :size, size] + penalty * prior_at_query)[..., None])[..., 0]
        estimates[number] = phi[:, 0]
    return estimates


def choose_blend(local: np.ndarray, sides: np.ndarray, site_mean: np.ndarray,
                 truth: np.ndarray, grid: np.ndarray,
                 standard_errors: float = CHOICE_STANDARD_ERRORS) -> tuple[int, np.ndarray]:
    """The hybrid's choice: one side and blend weights (a row of ``grid``) for
    ``w_l * local + w_s * side + w_m * site mean``, least squared error on ``truth``, kept
    only if the choice itself beats local out of fold (:func:`choice_beats_local`).

    All predictions are of the same validation rows, each made without the row itself,
    in random order. ``sides`` has shape (n_sides, n) and may be empty; ``grid[0]`` must
    be local only. The least error among 7 sides x 66 weights on a few hundred rows is
    optimistic (the winner's curse): on a small site the chosen blend erred less than
    local on the rows that chose it and more on the rows it imputed. So the site leaves
    local only when the selection, repeated without each fold of the rows and scored on
    that fold, beats local by ``standard_errors`` paired standard errors. Ties go to the
    first side and the first weights, so an uninformative side keeps local.
    """
    if not len(sides):
        sides = np.zeros((1, len(truth)))
        grid = grid[grid[:, 1] == 0]
    if not np.array_equal(grid[0], [1.0, 0.0, 0.0]):
        raise ValueError("the blend grid must list local only first")
    stacked = np.stack([np.broadcast_to(local, sides.shape), sides,
                        np.broadcast_to(site_mean, sides.shape)], axis=1)  # (side, 3, n)
    errors = (np.einsum("wp,spn->swn", grid, stacked) - truth) ** 2
    side, weights = _least(errors.mean(axis=2))
    if (side, weights) != (0, 0) and not choice_beats_local(errors, standard_errors):
        return 0, grid[0]
    return side, grid[weights]


def choice_beats_local(errors: np.ndarray, standard_errors: float,
                       n_folds: int = CHOICE_FOLDS) -> bool:
    """Whether choosing by least error beats local on rows it did not choose on.

    ``errors``: squared errors of every (side, weights) on every validation row, shape
    (sides, weights, n), local only at ``[0, 0]``. Each of ``n_folds`` folds of the rows
    is scored with the choice made on the others; the site's gain is local's error minus
    that, per row, and it must exceed ``standard_errors`` standard errors of its mean.
    Fewer rows than folds: one row per fold; fewer than three rows: no.
    """
    n_rows = errors.shape[2]
    if n_rows < 3:
        return False
    n_folds = min(n_folds, n_rows)
    fold = np.arange(n_rows) % n_folds
    chosen = np.empty(n_rows)
    for number in range(n_folds):
        held = fold == number
        side, weights = _least(errors[:, :, ~held].mean(axis=2))
        chosen[held] = errors[side, weights, held]
    gain = errors[0, 0] - chosen
    return bool(gain.mean() > standard_errors * gain.std(ddof=1) / np.sqrt(n_rows))


def _least(errors: np.ndarray) -> tuple[int, int]:
    """The (side, weights) of the least error; ties: the first."""
    side, weights = np.unravel_index(int(np.argmin(errors)), errors.shape)
    return int(side), int(weights)
