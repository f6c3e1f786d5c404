"""IIM over a bank's cells: the engines that turn cells into candidate models.

A cell plays the part of a tuple: its anchor is its noisy centroid, and its individual
model for ``ell`` is the ridge fit on the *sum* of the Gram matrices of its ``ell`` nearest
cells (anchor distance on the observed features F) — cumulative sums along each neighbour
list, as in IIM's incremental learning. The adaptive choice of ``ell`` (and so between a
local model and the global one) is IIM's Alg. 3 with the validation error of a model on a
neighbouring cell read off that cell's Gram matrix:
``sum (y - x phi)^2 = y^T y - 2 phi^T V' + phi^T U' phi``. The ridge penalty grows with
the noise of the pooled matrix (AdaSSP-style, ``alpha ~ sigma sqrt(d)``), and shrinks
towards the level-0 model — the ridge fit on every cell pooled, the federation's global
regression — rather than towards zero: ``phi = (U + alpha I)^-1 (V + alpha phi_0)``, so a
noisy small pool falls back to the global model, not to a flat one. Imputation: the k
nearest anchors give candidates, combined by candidate-distance voting. With exact
statistics, :class:`MixturePatternModels` reads the bank as a Gaussian mixture instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from fediim.federated.bank import DEFAULT_NOISE_ALPHA, BankConfig, ModelBank
from fediim.federated.gram import gram_count, project_psd, subsystem_index, subsystem_sse
from fediim.federated.principal import covariance_from_frame, covariance_to_frame, frame_boxes
from fediim.impute.iim import PatternResult, ridge_solve
from fediim.impute.neighbors import NeighborIndex

__all__ = ["BankModels", "CellPatternModels", "CellPooling", "MixturePatternModels",
           "pattern_models", "tied_covariance"]

#: Floats gathered at a time when pooling neighbouring cells' Grams (about 32 MB).
_POOLING_BLOCK_FLOATS = 4_000_000


def default_cell_grid(n_cells: int) -> np.ndarray:
    """1, 2, 3, 5, 8, ... (roughly geometric) up to all cells."""
    sizes = {1, 2, 3}
    size = 3.0
    while size < n_cells:
        size *= 1.6
        sizes.add(int(round(size)))
    return np.unique(np.clip(np.array(sorted(sizes)), 1, max(n_cells, 1)))


@dataclass(frozen=True)
class CellPooling:
    """What IIM over cells learns from, whatever the penalties.

    pooled : per ell of the grid, each cell's Gram summed over its ell nearest cells and
        their summed noise variance.
    model_cell, validation_cell : Alg. 3's pairs: ``validation_cell[p]`` has
        ``model_cell[p]`` among its k nearest other cells (empty: nothing to validate).
    rank : position of ``validation_cell[p]`` in ``model_cell[p]``'s pooling order
        (the number of cells: not pooled at any ell).
    """

    pooled: list[tuple[np.ndarray, np.ndarray]]
    model_cell: np.ndarray
    validation_cell: np.ndarray
    rank: np.ndarray


class CellPatternModels:
    """IIM over the bank's cells for one (target, features) pattern."""

    def __init__(self, bank: ModelBank, target: int, features: tuple[int, ...],
                 config: BankConfig) -> None:
        self.bank, self.target, self.features, self.config = bank, target, features, config
        columns = subsystem_index(target, features)
        # Work in standardised coordinates (federation-wide std per attribute, read off the
        # pooled Gram): ridge penalties then mean the same as in the centralized engine,
        # whatever the public bounds were.
        std = np.concatenate([[1.0], bank.feature_scale()])[columns]
        self._std = std
        self._grams = bank.gram[:, columns[:, None], columns[None, :]] / np.outer(std, std)
        # Noise std of a Gram entry in these coordinates: the cell's release std, scaled by
        # how far the cell's coordinates stretch (|center| + width per attribute).
        lo, hi = frame_boxes(bank.frame, bank.lo, bank.hi)
        reach = (np.abs(0.5 * (lo + hi)) + (hi - lo))[:, columns[1:] - 1]
        stretch = np.max(reach / std[1:], axis=1) ** 2
        self._noise_var = (bank.sigma * np.maximum(stretch, 1.0)) ** 2
        self._anchors = bank.anchors[:, list(features)] / std[1:-1]
        self._index = NeighborIndex(self._anchors)
        grid = config.ell_grid
        self._grid = default_cell_grid(bank.n_cells) if grid is None else np.unique(
            np.minimum(np.asarray(grid, dtype=int), bank.n_cells))
        self._phi: np.ndarray | None = None
        self._ell: np.ndarray | None = None
        self._prior = self._level_zero()

    def _alpha(self, noise_var: np.ndarray) -> np.ndarray:
        """Ridge penalty of a model pooled from Grams with total noise variance
        ``noise_var``: the base penalty plus one that grows with the noise."""
        n_coefficients = len(self.features) + 1
        multiplier = self.config.noise_alpha
        multiplier = DEFAULT_NOISE_ALPHA if multiplier is None else multiplier
        return self.config.alpha + multiplier * np.sqrt(noise_var) * np.sqrt(n_coefficients)

    def _learn(self) -> None:
        """Give every cell the model of the ell (pooled cells) that validates best."""
        n_cells = self.bank.n_cells
        pooling = self._pooling
        candidates = np.stack([ridge_solve(gram, self._alpha(noise_var), prior=self._prior)
                               for gram, noise_var in pooling.pooled], axis=1)  # (C, L, p)
        if len(self._grid) > 1 and pooling.model_cell.size:
            best = self._best_by_validation(candidates, pooling)
        else:
            best = np.full(n_cells, len(self._grid) - 1)
        self._phi = candidates[np.arange(n_cells), best]
        self._ell = self._grid[best]

    @cached_property
    def _pooling(self) -> CellPooling:
        """What learning needs before any penalty: each cell's neighbour list, its pooled
        Grams per ell of the grid, and the (model, validation) cell pairs of Alg. 3."""
        n_cells = self.bank.n_cells
        _, neighbors = self._index.query(self._anchors, int(self._grid[-1]))
        n_validators = min(self.config.n_neighbors, n_cells - 1)
        model_cell = np.zeros(0, dtype=np.intp)
        validation_cell = rank = model_cell
        if len(self._grid) > 1 and n_validators > 0:
            model_cell = self._index.nearest_others(n_validators).ravel()
            validation_cell = np.repeat(np.arange(n_cells), n_validators)
            # Position of the validation cell in the model cell's pooling order (n_cells:
            # not pooled at any ell); a neighbour list holds each cell at most once.
            order = np.full((n_cells, n_cells), n_cells, dtype=np.intp)
            np.put_along_axis(order, neighbors, np.arange(neighbors.shape[1])[None], axis=1)
            rank = order[model_cell, validation_cell]
        return CellPooling(self._pooled_statistics(neighbors), model_cell, validation_cell,
                           rank)

    def with_penalties(self, config: BankConfig) -> CellPatternModels:
        """The same pattern read with ``config``, which may differ from this one only in
        its penalties (``alpha``, ``noise_alpha``): the neighbour lists and pooled Grams
        are shared (computed once), only the ridge solves are redone."""
        if not self.differs_only_in_penalties(config):
            raise ValueError("with_penalties: the configurations differ beyond penalties")
        _ = self._pooling  # computed before the copy, so that the copy shares it
        other = copy.copy(self)
        other.config, other._phi, other._ell = config, None, None
        other._prior = other._level_zero()
        return other

    def differs_only_in_penalties(self, config: BankConfig) -> bool:
        """Whether ``config`` is this model's configuration but for ``alpha`` and
        ``noise_alpha`` (see :meth:`with_penalties`)."""
        return replace(config, alpha=self.config.alpha,
                       noise_alpha=self.config.noise_alpha) == self.config

    def _level_zero(self) -> np.ndarray:
        """Level 0: every cell pooled, the federation's global regression; pooled models
        are shrunk towards it."""
        return ridge_solve(self._grams.sum(axis=0), self._alpha(self._noise_var.sum()))

    def _pooled_statistics(self, neighbors: np.ndarray
                           ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per ell of the grid, each cell's Gram summed over its ell nearest cells and the
        summed noise variance: cumulative sums along the neighbour lists, a block of cells
        at a time (bounded temporaries; each cell's sums are the same either way)."""
        n_cells = self.bank.n_cells
        gram = np.zeros((n_cells, *self._grams.shape[1:]))
        noise_var = np.zeros(n_cells)
        block = max(1, _POOLING_BLOCK_FLOATS // max(neighbors.shape[1] * gram[0].size, 1))
        pooled = []
        previous = 0
        for ell in self._grid:
            for start in range(0, n_cells, block):
                cells = slice(start, start + block)
                gram[cells] += self._grams[neighbors[cells, previous:ell]].sum(axis=1)
            noise_var += self._noise_var[neighbors[:, previous:ell]].sum(axis=1)
            previous = int(ell)
            pooled.append((gram.copy(), noise_var.copy()))
        return pooled

    def _best_by_validation(self, candidates: np.ndarray, pooling: CellPooling
                            ) -> np.ndarray:
        """Per cell, the grid position whose model errs least on the cells that have it
        among their k nearest (errors read off their Grams). A cell that validates no one
        keeps the largest ell."""
        n_cells = self.bank.n_cells
        model_cell, validation_cell = pooling.model_cell, pooling.validation_cell
        validation_grams = self._grams[validation_cell]
        cost = np.zeros((n_cells, len(self._grid)))
        for position, ell in enumerate(self._grid):
            phi = self._without_validation_cell(
                candidates[model_cell, position], pooling.pooled[position], model_cell,
                validation_cell, np.flatnonzero(pooling.rank < ell))
            cost[:, position] = np.bincount(
                model_cell, weights=subsystem_sse(phi, validation_grams), minlength=n_cells)
        best = np.argmin(cost, axis=1)
        best[np.bincount(model_cell, minlength=n_cells) == 0] = len(self._grid) - 1
        return best

    def _without_validation_cell(self, phi: np.ndarray, pooled: tuple[np.ndarray, np.ndarray],
                                 model_cell: np.ndarray, validation_cell: np.ndarray,
                                 inside: np.ndarray) -> np.ndarray:
        """Leave-cell-out: where the validation cell is among the cells pooled into the
        model (pairs ``inside``), the model refitted without it, the cell analogue of LOO."""
        if not inside.size:
            return phi
        gram, noise_var = pooled
        models, held = model_cell[inside], validation_cell[inside]
        phi = phi.copy()
        phi[inside] = ridge_solve(gram[models] - self._grams[held],
                                  self._alpha(noise_var[models] - self._noise_var[held]),
                                  prior=self._prior)
        return phi

    def impute(self, queries: np.ndarray) -> PatternResult:
        """Impute the target for queries given on F (scaled coordinates)."""
        if self._phi is None:
            self._learn()
        assert self._phi is not None and self._ell is not None
        n_nearest = min(self.config.n_neighbors, self.bank.n_cells)
        standardized = np.asarray(queries) / self._std[1:-1]
        _, nearest = self._index.query(standardized, n_nearest)
        augmented = np.column_stack([np.ones(len(standardized)), standardized])
        candidates = np.einsum("qf,qkf->qk", augmented, self._phi[nearest]) * self._std[-1]
        return PatternResult.vote(candidates, nearest, self._ell[nearest])

    def coefficients(self, queries: np.ndarray) -> np.ndarray:
        """Per query, the linear model (intercept, slopes on F; scaled coordinates) that the
        voting applies there: the vote-weighted mean of its k nearest cells' models, whose
        value at the query is :meth:`impute`'s. Shape (queries, len(F) + 1)."""
        found = self.impute(queries)
        assert self._phi is not None
        phi = np.einsum("qk,qkf->qf", found.weights, self._phi[found.neighbors])
        return np.column_stack([phi[:, 0], phi[:, 1:] / self._std[1:-1]]) * self._std[-1]


_MIXTURE_BLOCK_FLOATS = 4_000_000


class MixturePatternModels:
    """The bank's cells as a Gaussian mixture; imputation = E[target | observed features].

    Each cell c is a component with weight n_c (its count), mean mu_c and covariance S_c read
    off its Gram matrix; S_c is shrunk towards the covariance of a uniform distribution on
    the cell's public box with ``mixture_prior`` pseudo-records, so thin cells stay proper.
    For a query x_F the estimate is ``sum_c r_c(x_F) (mu_c,a + S_c,aF S_c,FF^-1 (x_F -
    mu_c,F))`` with responsibilities ``r_c ~ n_c N(x_F; mu_c,F, S_c,FF)``: the cells whose
    region holds the query decide, each with its own within-cell regression, and cells that
    differ only in the target (a partition also cuts along it) are weighed by the data
    instead of by anchor distance. Cells of several trees over the same records simply add
    up as components (an ensemble of partitions).

    A noised bank's per-cell covariances are noise (a cell of ~40 records at Gram noise
    sigma ~ 10 in its own coordinates), so there every cell takes the federation's
    within-cell covariance in cell coordinates instead (:func:`tied_covariance`): each cell
    keeps its own count, mean and box, and so its own intercept and region. A bank cut
    along principal axes (``bank.frame``) has its boxes in that frame: the tie and the
    box prior are taken there and mapped back.
    """

    def __init__(self, bank: ModelBank, target: int, features: tuple[int, ...],
                 config: BankConfig) -> None:
        self.bank, self.target, self.features, self.config = bank, target, features, config
        counts = np.maximum(gram_count(bank.gram), 1.0)
        means = bank.anchors  # the cells' centroids
        covariance = (bank.gram[:, 1:, 1:] / counts[:, None, None]
                      - means[:, :, None] * means[:, None, :])
        frame = bank.frame
        if np.any(bank.sigma > 0):
            covariance = covariance_from_frame(frame, tied_covariance(
                covariance_to_frame(frame, covariance), counts, bank.lo, bank.hi))
        box_variance = (bank.hi - bank.lo) ** 2 / 12.0
        prior_records = config.mixture_prior
        columns = np.asarray(list(features) + [target])
        covariance = covariance[:, columns[:, None], columns[None, :]]
        prior = covariance_from_frame(frame, box_variance[:, :, None] * np.eye(
            bank.n_features)[None])[:, columns[:, None], columns[None, :]]
        covariance = ((counts[:, None, None] * covariance + prior_records * prior)
                      / (counts + prior_records)[:, None, None])
        n_features = len(features)
        feature_covariance = covariance[:, :n_features, :n_features]
        cholesky = np.linalg.cholesky(feature_covariance)
        self._whiten = np.linalg.inv(cholesky)  # (C, f, f)
        self._log_weight = np.log(counts) - np.log(
            np.diagonal(cholesky, axis1=1, axis2=2)).sum(axis=1)
        self._beta = np.linalg.solve(feature_covariance,
                                     covariance[:, :n_features, n_features:])[..., 0]  # (C, f)
        self._mean_features = means[:, list(features)]
        self._mean_target = means[:, target]

    def impute(self, queries: np.ndarray) -> PatternResult:
        """Impute the target for queries given on F (the bank's scaled coordinates)."""
        queries = np.asarray(queries, dtype=np.float64)
        n_top = min(self.config.n_neighbors, self.bank.n_cells)
        # Queries per block so that a (block, cells, features) array stays near 32 MB.
        block = max(1, min(256, _MIXTURE_BLOCK_FLOATS // max(self._mean_features.size, 1)))
        values, spread = np.empty(len(queries)), np.empty(len(queries))
        top = np.empty((len(queries), n_top), dtype=np.int64)
        top_weight, top_estimate = np.empty((len(queries), n_top)), np.empty((len(queries),
                                                                               n_top))
        for start in range(0, len(queries), block):
            part = slice(start, start + block)
            responsibility, estimate = self._components(queries[part])
            value = (responsibility * estimate).sum(axis=1)
            values[part] = value
            spread[part] = np.sqrt(
                (responsibility * (estimate - value[:, None]) ** 2).sum(axis=1))
            order = np.argsort(-responsibility, axis=1)[:, :n_top]
            top[part] = order
            top_weight[part] = np.take_along_axis(responsibility, order, axis=1)
            top_estimate[part] = np.take_along_axis(estimate, order, axis=1)
        # Provenance: the k most responsible cells (their share of the vote, their estimate).
        return PatternResult(values, spread, top, np.ones_like(top), top_weight, top_estimate)

    def coefficients(self, queries: np.ndarray) -> np.ndarray:
        """Per query, the responsibility-weighted mean of the cells' regressions (intercept,
        slopes on F; scaled coordinates), whose value at the query is :meth:`impute`'s.
        Shape (queries, len(F) + 1)."""
        queries = np.asarray(queries, dtype=np.float64)
        models = np.column_stack([
            self._mean_target - np.einsum("cf,cf->c", self._beta, self._mean_features),
            self._beta])
        block = max(1, min(256, _MIXTURE_BLOCK_FLOATS // max(self._mean_features.size, 1)))
        return np.concatenate([self._components(queries[start:start + block])[0] @ models
                               for start in range(0, len(queries), block)]
                              or [np.zeros((0, models.shape[1]))])

    def _components(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's responsibility for each query and its within-cell estimate, both of
        shape (queries, cells)."""
        offset = queries[:, None, :] - self._mean_features[None]  # (b, C, f)
        whitened = np.einsum("cij,bcj->bci", self._whiten, offset)
        log_responsibility = self._log_weight[None] - 0.5 * np.einsum(
            "bci,bci->bc", whitened, whitened)
        log_responsibility -= log_responsibility.max(axis=1, keepdims=True)
        responsibility = np.exp(log_responsibility)
        responsibility /= responsibility.sum(axis=1, keepdims=True)
        estimate = self._mean_target[None] + np.einsum("cf,bcf->bc", self._beta, offset)
        return responsibility, estimate


def tied_covariance(covariance: np.ndarray, counts: np.ndarray, lo: np.ndarray,
                    hi: np.ndarray) -> np.ndarray:
    """Every cell's within-cell covariance replaced by the count-weighted mean of all
    cells' covariances in cell coordinates (each cell's box mapped to the unit cube),
    mapped back to each cell's box; clipped to PSD. Post-processing of the released
    Grams: the mean over hundreds of cells averages their noise away, which each cell's
    own covariance cannot.

    Shapes: ``covariance`` (C, m, m), ``counts`` (C,), ``lo``/``hi`` (C, m)."""
    width = np.maximum(hi - lo, 1e-12)
    scale = width[:, :, None] * width[:, None, :]
    weights = counts / counts.sum()
    shape = project_psd(np.einsum("c,cij->ij", weights, covariance / scale))
    return shape[None] * scale


#: Either bank engine: both impute a pattern's queries into a :class:`PatternResult`.
BankModels = CellPatternModels | MixturePatternModels


def pattern_models(bank: ModelBank, target: int, features: tuple[int, ...],
                   config: BankConfig) -> BankModels:
    """The bank engine ``config.engine`` asks for (``auto``: mixture iff the bank is exact).

    IIM over cells reads only tree 0 of a bank with several trees (see below).
    """
    # Only cells whose site measures every attribute of the pattern describe it.
    covering = bank.observed[:, [*features, target]].all(axis=1)
    if not covering.all():
        bank = bank.select(covering)
    if bank.n_cells == 0:
        raise ValueError("no cell in the bank measures every attribute of this pattern")
    engine = config.engine
    if engine == "auto":
        engine = "mixture" if bank.n_cells and np.all(bank.sigma == 0) else "cells"
    if engine == "mixture":
        return MixturePatternModels(bank, target, features, config)
    # IIM over cells pools neighbouring cells of one partition; the extra trees of an exact
    # bank would count records several times (and cost 4x the cells), so it reads tree 0.
    if bank.n_trees > 1:
        bank = bank.select(bank.tree == 0)
    return CellPatternModels(bank, target, features, config)
