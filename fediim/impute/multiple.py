"""Multiple imputation with IIM: M completed tables drawn from the predictive distribution.

A single imputation (the candidates' vote) is the engine's best guess; analysed as if it
were data, it understates every standard error. Multiple imputation draws M completed
tables instead, each cell from its predictive distribution, and an analysis pooled over
them with Rubin's rules (:func:`fediim.mi.pool`) carries the imputation's uncertainty.
For each imputation and each missing cell:

1. *Parameter uncertainty* (what makes the imputation proper): the models are learned on
   a random half of the training rows, drawn afresh per imputation (``posterior="half"``).
   A half-sample's fit departs from the full fit by about the full fit's own sampling
   error, and it holds no duplicate rows: on the approximate Bayesian bootstrap
   (``"bootstrap"``, Rubin and Schenker 1986) IIM's validation sees exact copies, prefers
   nearest-neighbour models and doubles the noise of the draws (benchmarks/README.md,
   "Multiple imputation").
2. *Candidate spread*: one of the k neighbours' candidates is drawn with its vote weight.
3. *Residual variance*: Gaussian noise is added with the variance the engine measured
   while validating the models it combines (:meth:`PatternModels.validation_mse`, the
   vote-weighted mean over the query's neighbours, learned on all training rows).

The draw of a cell's value is one function per column kind (:data:`CELL_DRAWS`), in the
engine's encoded columns (:mod:`fediim.impute.encoding`). A numeric or ordinal column draws
as above (an ordinal rank is then rounded to the nearest level). A binary or categorical
column keeps its vote instead: each indicator's voted score from the imputation's own
half-sample models, which the decoding turns into the cell's distribution over the levels
and draws the level from (:func:`~fediim.impute.encoding.draw_levels`), so every drawn
cell is a declared level and the spread between imputations carries the models' own
uncertainty. A voted cell no model can impute draws from the column's level frequencies.
A drawn voted cell's ``probability`` is the one its own draw gave the level it drew (its
``uncertainty`` 1 - probability), as :func:`fediim.federated.multiple.renoised_draws`
reports it; the single imputation's is its winner's, which a draw need not be.

``benchmarks/coverage.py`` measures the coverage that decided these choices.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from fediim.impute.encoding import MixedEncoding, draw_levels, level_probabilities
from fediim.impute.iim import PatternModels, PatternResult
from fediim.io.result import ImputationResult

__all__ = ["CELL_DRAWS", "POSTERIORS", "CellDraw", "FittedIIM", "Posterior",
           "draw_imputations", "draw_numeric", "resampled_rows", "voted_score"]

Posterior = Literal["bootstrap", "half", "none"]
#: How each imputation resamples the training rows: the approximate Bayesian bootstrap,
#: half-sampling without replacement, or not at all (an improper imputation).
POSTERIORS: tuple[str, ...] = ("bootstrap", "half", "none")


#: A missingness pattern's rows, the columns they observe and those they miss.
PatternGroup = tuple[np.ndarray, tuple[int, ...], list[int]]


class FittedIIM(Protocol):
    """What the draws read of a fitted :class:`~fediim.impute.IIMImputer` (the estimator
    imports this module, so it is described here rather than imported)."""

    mean_: np.ndarray
    scale_: np.ndarray
    statistics_: np.ndarray
    encoding_: MixedEncoding | None
    _fit_X: np.ndarray
    _fit_observed: np.ndarray
    _patterns: dict[tuple[int, tuple[int, ...]], PatternModels | None]

    def pattern(self, target: int, features: tuple[int, ...]) -> PatternModels | None: ...


@dataclass(frozen=True)
class CellDraw:
    """What a cell's draw reads: the candidates and vote of the (resampled) models, and
    the residual variance of the models learned on every training row (standardized)."""

    found: PatternResult
    residual_variance: np.ndarray  # (q,)


def draw_numeric(draw: CellDraw, rng: np.random.Generator) -> np.ndarray:
    """A numeric cell's draw: a candidate chosen with its vote weight, plus Gaussian noise
    of the residual variance (standardized units)."""
    weights = draw.found.weights
    cumulative = np.cumsum(weights, axis=1)
    uniform = rng.random(len(weights)) * cumulative[:, -1]
    chosen = np.minimum((cumulative < uniform[:, None]).sum(axis=1), weights.shape[1] - 1)
    assert draw.found.candidates is not None
    candidate = draw.found.candidates[np.arange(len(weights)), chosen]
    noise = rng.standard_normal(len(weights)) * np.sqrt(draw.residual_variance)
    return candidate + noise


def voted_score(draw: CellDraw, rng: np.random.Generator) -> np.ndarray:
    """An indicator (or binary code) of a voted cell: its voted score, with no noise; the
    decoding draws the level from the scores of the cell's indicators."""
    return draw.found.values


#: One draw per column kind, in standardized encoded units.
CELL_DRAWS: dict[str, Callable[[CellDraw, np.random.Generator], np.ndarray]] = {
    "numeric": draw_numeric,
    "ordinal": draw_numeric,
    "binary": voted_score,
    "categorical": voted_score,
}
#: The kinds whose cells take the residual noise (the others draw a level).
NOISED_KINDS: tuple[str, ...] = ("numeric", "ordinal")


def resampled_rows(n_rows: int, posterior: Posterior, rng: np.random.Generator
                   ) -> np.ndarray:
    """Training-row positions for one imputation (sorted, with repeats for the
    bootstrap): ``bootstrap`` draws n from a bootstrap sample of the n rows, ``half``
    takes n/2 rows without replacement (whose spread around the full fit matches the
    fit's own sampling variance), ``none`` keeps every row."""
    if posterior == "bootstrap":
        first = rng.integers(0, n_rows, n_rows)
        return np.sort(first[rng.integers(0, n_rows, n_rows)])
    if posterior == "half":
        return np.sort(rng.choice(n_rows, size=max(n_rows // 2, 1), replace=False))
    if posterior == "none":
        return np.arange(n_rows)
    raise ValueError(f"posterior must be one of {', '.join(POSTERIORS)}; got {posterior!r}")


def draw_imputations(imputer: FittedIIM, x: np.ndarray, single: ImputationResult,
                     groups: Sequence[PatternGroup], n_imputations: int,
                     rng: np.random.Generator, posterior: Posterior = "half"
                     ) -> list[ImputationResult]:
    """``n_imputations`` draws of the completed ``x`` (validated, raw units; coded columns
    as level codes) from a fitted ``imputer``, whose single imputation of ``x`` is
    ``single`` and whose engine matrix (``x`` encoded) has the missingness patterns
    ``groups``. Observed cells are copied exactly; the provenance columns (method, ell,
    n_candidates) are the single imputation's, as is the uncertainty of a numeric or
    ordinal cell; a voted cell's probability and uncertainty are its drawn level's."""
    encoding = imputer.encoding_
    engine = x if encoding is None else encoding.encode(x)
    kinds = ["numeric"] * engine.shape[1] if encoding is None else encoding.encoded_kinds()
    draws = []
    for _ in range(n_imputations):
        rows = resampled_rows(len(imputer._fit_X), posterior, rng)
        resampled = _refitted_on(imputer, rows) if posterior != "none" else imputer
        result = copy.deepcopy(single)
        if encoding is None:
            _fill_draws(imputer, resampled, engine, result.values, groups, kinds, rng)
        else:
            values = engine.copy()
            _fill_draws(imputer, resampled, engine, values, groups, kinds, rng)
            result.values = encoding.decoded_values(
                values, x, lambda probabilities: draw_levels(probabilities, rng))
            _report_drawn_levels(encoding, values, x, result)
        draws.append(result)
    return draws


def _report_drawn_levels(encoding: MixedEncoding, scores: np.ndarray, codes: np.ndarray,
                         result: ImputationResult) -> None:
    """Set each drawn voted cell's ``probability`` to the one its draw's ``scores`` (the
    engine matrix the levels were drawn from, raw units) gave the level in
    ``result.values``, and its ``uncertainty`` to 1 - that (the copied single imputation
    reports its own winner's; ``codes``: the table, NaN where imputed)."""
    for j, (coding, block) in enumerate(zip(encoding.codings, encoding.blocks, strict=True)):
        cells = np.isnan(codes[:, j])
        if coding.kind not in ("binary", "categorical") or not cells.any():
            continue
        probabilities = level_probabilities(scores[np.ix_(cells, block)], coding.kind)
        drawn = result.values[cells, j].astype(np.intp)
        chosen = probabilities[np.arange(len(drawn)), drawn]
        result.probability[cells, j] = chosen
        result.uncertainty[cells, j] = 1.0 - chosen


def _refitted_on(imputer: FittedIIM, rows: np.ndarray) -> FittedIIM:
    """A copy of the fitted ``imputer`` whose training rows are ``rows`` (same scaling,
    so its models and the full fit's live in the same coordinates)."""
    resampled = copy.copy(imputer)
    resampled._fit_X = imputer._fit_X[rows]
    resampled._fit_observed = imputer._fit_observed[rows]
    resampled._patterns = {}
    return resampled


def _fill_draws(imputer: FittedIIM, resampled: FittedIIM, x: np.ndarray, values: np.ndarray,
                groups: Sequence[PatternGroup], kinds: Sequence[str],
                rng: np.random.Generator) -> None:
    """Overwrite every missing cell of the engine matrix ``values`` (raw units) with a
    draw of its column's kind (``kinds``, per engine column)."""
    for rows, features, targets in groups:
        queries = ((x[rows] - imputer.mean_) / imputer.scale_)[:, list(features)]
        for target in targets:
            full = imputer.pattern(target, features) if features else None
            if full is None:
                values[rows, target] = _draw_marginal(imputer, target, kinds[target],
                                                      len(rows), rng)
                continue
            models = resampled.pattern(target, features) or full
            variance = (_residual_variance(full, queries) if kinds[target] in NOISED_KINDS
                        else np.zeros(len(rows)))
            drawn = CELL_DRAWS[kinds[target]](CellDraw(models.impute(queries), variance), rng)
            values[rows, target] = drawn * imputer.scale_[target] + imputer.mean_[target]


def _residual_variance(models: PatternModels, queries: np.ndarray) -> np.ndarray:
    """Per query, the vote-weighted validation MSE of its neighbours' models (a model
    that validated nothing counts as the pattern's median)."""
    found = models.impute(queries)
    mse = models.validation_mse(found.neighbors.ravel()).reshape(found.neighbors.shape)
    fallback = np.nanmedian(mse) if np.any(np.isfinite(mse)) else 1.0
    mse = np.where(np.isfinite(mse), mse, fallback)
    return (found.weights * mse).sum(axis=1)


def _draw_marginal(imputer: FittedIIM, target: int, kind: str, n_cells: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Cells no model can impute (the rows observe nothing usable), raw units: values
    drawn from the column's observed values (a hot deck from its marginal distribution);
    for a voted column, its observed mean, the level frequency the decoding draws from."""
    if kind not in NOISED_KINDS:
        return np.full(n_cells, imputer.statistics_[target])
    observed = imputer._fit_X[imputer._fit_observed[:, target], target]
    values = observed[rng.integers(0, len(observed), n_cells)]
    return values * imputer.scale_[target] + imputer.mean_[target]
