"""IIM over a bank's cells: the engines that turn cells into candidate models.

A cell plays the part of a tuple: its anchor is its noisy centroid, and its individual
model for ``ell`` is the ridge fit on the *sum* of the Gram matrices of its ``ell`` nearest
cells (anchor distance on the observed features F) — cumulative sums along each neighbour
list, as in IIM's incremental learning. The adaptive choice of ``ell`` (and so between a
local model and the global one) is IIM's Alg. 3 with the validation error of a model on a
neighbouring cell read off that cell's Gram matrix:
``sum (y - x phi)^2 = y^T y - 2 phi^T V' + phi^T U' phi``. The ridge penalty grows with
the noise of the pooled matrix (AdaSSP-style, ``alpha ~ sigma sqrt(d)``). Imputation: the
k nearest anchors give candidates, combined by candidate-distance voting. With exact
statistics, :class:`MixturePatternModels` reads the bank as a Gaussian mixture instead.
"""

from __future__ import annotations

import numpy as np

from fediim.federated.bank import DEFAULT_NOISE_ALPHA, BankConfig, ModelBank
from fediim.federated.gram import gram_count, subsystem_index, subsystem_sse
from fediim.impute.iim import PatternResult, ridge_solve
from fediim.impute.neighbors import NeighborIndex

__all__ = ["BankModels", "CellPatternModels", "MixturePatternModels", "pattern_models"]

def default_cell_grid(n_cells: int) -> np.ndarray:
    """1, 2, 3, 5, 8, ... (roughly geometric) up to all cells."""
    g = {1, 2, 3}
    v = 3.0
    while v < n_cells:
        v *= 1.6
        g.add(int(round(v)))
    return np.unique(np.clip(np.array(sorted(g)), 1, max(n_cells, 1)))


class CellPatternModels:
    """IIM over the bank's cells for one (target, features) pattern."""

    def __init__(self, bank: ModelBank, target: int, features: tuple[int, ...],
                 config: BankConfig) -> None:
        self.bank, self.target, self.features, self.config = bank, target, features, config
        idx = subsystem_index(target, features)
        # Work in standardised coordinates (federation-wide std per attribute, read off the
        # pooled Gram): ridge penalties then mean the same as in the centralized engine,
        # whatever the public bounds were.
        std = np.concatenate([[1.0], bank.feature_scale()])[idx]
        self._std = std
        self._g = bank.gram[:, idx[:, None], idx[None, :]] / np.outer(std, std)
        # Noise std of a Gram entry in these coordinates: the cell's release std, scaled by
        # how far the cell's coordinates stretch (|center| + width per attribute).
        reach = (np.abs(0.5 * (bank.lo + bank.hi)) + (bank.hi - bank.lo))[:, idx[1:] - 1]
        stretch = np.max(reach / std[1:], axis=1) ** 2
        self._noise = (bank.sigma * np.maximum(stretch, 1.0)) ** 2
        self._anchors = bank.anchors[:, list(features)] / std[1:-1]
        self._index = NeighborIndex(self._anchors)
        c = bank.n_cells
        grid = config.ell_grid
        self._grid = default_cell_grid(c) if grid is None else np.unique(
            np.minimum(np.asarray(grid, dtype=int), c))
        self._phi: np.ndarray | None = None
        self._ell: np.ndarray | None = None

    def _alpha(self, noise_var: np.ndarray) -> np.ndarray:
        p = len(self.features) + 1
        na = self.config.noise_alpha
        na = DEFAULT_NOISE_ALPHA if na is None else na
        return self.config.alpha + na * np.sqrt(noise_var) * np.sqrt(p)

    def _learn(self) -> None:
        c = self.bank.n_cells
        p = len(self.features) + 1
        lmax = int(self._grid[-1])
        _, nbr = self._index.query(self._anchors, lmax)
        cands, pooled, pooled_nv = [], [], []
        g = np.zeros((c, p + 1, p + 1))
        nv = np.zeros(c)
        prev = 0
        for ell in self._grid:
            g += self._g[nbr[:, prev:ell]].sum(axis=1)
            nv += self._noise[nbr[:, prev:ell]].sum(axis=1)
            prev = int(ell)
            cands.append(ridge_solve(g, self._alpha(nv)))
            pooled.append(g.copy())
            pooled_nv.append(nv.copy())
        cands = np.stack(cands, axis=1)  # (C, L, p)
        k = min(self.config.n_neighbors, c - 1)
        if len(self._grid) > 1 and k > 0:
            _, vn = self._index.query(self._anchors, k + 1)
            keep = vn != np.arange(c)[:, None]
            keep[keep.all(axis=1), -1] = False
            i = vn[keep].reshape(c, k).ravel()
            j = np.repeat(np.arange(c), k)
            cost = np.zeros((c, len(self._grid)))
            gj = self._g[j]
            # Leave-cell-out: where validation cell j is one of the ell cells pooled into
            # i's model, score the model refitted without it (the cell analogue of LOO).
            match = nbr[i] == j[:, None]
            rank = np.where(match.any(axis=1), match.argmax(axis=1), c)
            for li, ell in enumerate(self._grid):
                phi = cands[i, li]
                inside = np.flatnonzero(rank < ell)
                if inside.size:
                    ii, jj = i[inside], j[inside]
                    phi = phi.copy()
                    phi[inside] = ridge_solve(pooled[li][ii] - self._g[jj],
                                              self._alpha(pooled_nv[li][ii] - self._noise[jj]))
                sse = subsystem_sse(phi, gj)
                cost[:, li] = np.bincount(i, weights=sse, minlength=c)
            best = np.argmin(cost, axis=1)
            best[np.bincount(i, minlength=c) == 0] = len(self._grid) - 1
        else:
            best = np.full(c, len(self._grid) - 1)
        self._phi = cands[np.arange(c), best]
        self._ell = self._grid[best]

    def impute(self, queries: np.ndarray) -> PatternResult:
        """Impute the target for queries given on F (scaled coordinates)."""
        if self._phi is None:
            self._learn()
        assert self._phi is not None and self._ell is not None
        k = min(self.config.n_neighbors, self.bank.n_cells)
        qs = np.asarray(queries) / self._std[1:-1]
        _, nbr = self._index.query(qs, k)
        qaug = np.column_stack([np.ones(len(qs)), qs])
        cand = np.einsum("qf,qkf->qk", qaug, self._phi[nbr]) * self._std[-1]
        return PatternResult.vote(cand, nbr, self._ell[nbr])


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
    up as components (an ensemble of partitions). Needs exact or nearly exact covariances.
    """

    def __init__(self, bank: ModelBank, target: int, features: tuple[int, ...],
                 config: BankConfig) -> None:
        self.bank, self.target, self.features, self.config = bank, target, features, config
        g = bank.gram
        n = np.maximum(gram_count(g), 1.0)
        mu = bank.anchors  # the cells' centroids
        cov = g[:, 1:, 1:] / n[:, None, None] - mu[:, :, None] * mu[:, None, :]
        box = (bank.hi - bank.lo) ** 2 / 12.0
        tau = config.mixture_prior
        idx = np.asarray(list(features) + [target])
        cov = cov[:, idx[:, None], idx[None, :]]
        prior = box[:, idx, None] * np.eye(len(idx))[None]
        cov = (n[:, None, None] * cov + tau * prior) / (n + tau)[:, None, None]
        f = len(features)
        sff = cov[:, :f, :f]
        chol = np.linalg.cholesky(sff)
        self._whiten = np.linalg.inv(chol)  # (C, f, f)
        self._logw = np.log(n) - np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        self._beta = np.linalg.solve(sff, cov[:, :f, f:])[..., 0]  # (C, f)
        self._mu_f = mu[:, list(features)]
        self._mu_a = mu[:, target]

    def impute(self, queries: np.ndarray) -> PatternResult:
        """Impute the target for queries given on F (the bank's scaled coordinates)."""
        q = np.asarray(queries, dtype=np.float64)
        k = min(self.config.n_neighbors, self.bank.n_cells)
        # Queries per block so that a (block, cells, features) array stays near 32 MB.
        block = max(1, min(256, _MIXTURE_BLOCK_FLOATS // max(self._mu_f.size, 1)))
        vals, spread = np.empty(len(q)), np.empty(len(q))
        top = np.empty((len(q), k), dtype=np.int64)
        wtop, ctop = np.empty((len(q), k)), np.empty((len(q), k))
        for s in range(0, len(q), block):
            d = q[s:s + block, None, :] - self._mu_f[None]  # (b, C, f)
            z = np.einsum("cij,bcj->bci", self._whiten, d)
            logr = self._logw[None] - 0.5 * np.einsum("bci,bci->bc", z, z)
            logr -= logr.max(axis=1, keepdims=True)
            r = np.exp(logr)
            r /= r.sum(axis=1, keepdims=True)
            cand = self._mu_a[None] + np.einsum("cf,bcf->bc", self._beta, d)
            v = (r * cand).sum(axis=1)
            vals[s:s + block] = v
            spread[s:s + block] = np.sqrt((r * (cand - v[:, None]) ** 2).sum(axis=1))
            order = np.argsort(-r, axis=1)[:, :k]
            top[s:s + block] = order
            wtop[s:s + block] = np.take_along_axis(r, order, axis=1)
            ctop[s:s + block] = np.take_along_axis(cand, order, axis=1)
        # Provenance: the k most responsible cells (their share of the vote, their estimate).
        return PatternResult(vals, spread, top, np.ones_like(top), wtop, ctop)


#: Either bank engine: both impute a pattern's queries into a :class:`PatternResult`.
BankModels = CellPatternModels | MixturePatternModels


def pattern_models(bank: ModelBank, target: int, features: tuple[int, ...],
                   config: BankConfig) -> BankModels:
    """The bank engine ``config.engine`` asks for (``auto``: mixture iff the bank is exact).

    IIM over cells reads only tree 0 of a bank with several trees (see below).
    """
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
