"""IIM — Imputation via Individual Models (Zhang, Song, Sun, Wang; ICDE 2019), centralized.

One *pattern* is a pair (target attribute A, observed feature set F). For a pattern, every
training row t_i (observed on F and A) gets an individual ridge model phi_i learned on its
ell nearest training rows on F (t_i itself first):

    phi_i = (X^T X + alpha I)^-1 X^T Y,   X = [1, t[F]],  Y = t[A];   ell = 1 -> (t_i[A], 0, ..)

* Adaptive ell (Alg. 3): every training row t_j is a validation tuple; each of its k nearest
  rows t_i (t_j excluded) is charged ``(t_j[A] - (1, t_j[F]) phi_i^(ell))^2`` for every
  candidate ell; t_i keeps the candidate of least cost. By default the residual is the exact
  leave-one-out one when t_j is among t_i's own ell learning neighbours (the paper's
  in-sample residual rewards small ell for fitting its validation tuples; measured gains on
  ccs, wine and asf in benchmarks/README.md). The candidates may also include
  several ridge alphas and the global model (ell = n), chosen the same way.
* Incremental learning (Prop. 3): U^(ell+h) = U^(ell) + dX^T dX and V likewise, i.e. a
  cumulative Gram matrix along each row's sorted neighbour list, so the cost per candidate
  does not grow with ell. All solves are batched (stacked ``np.linalg.solve``).
* Imputation (Alg. 2): the k nearest training rows of the query give candidates
  c_i = (1, t_x[F]) phi_i, combined with weights w_i proportional to 1 / sum_j |c_i - c_j|
  (all candidates equal -> plain mean).

Models are computed lazily, only for the training rows that some query actually uses as an
imputation neighbour, and cached: fitting is cheap, and repeated transforms reuse models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fediim.impute.neighbors import NeighborIndex

__all__ = [
    "IIMConfig",
    "PatternModels",
    "auto_ell_grid",
    "vote_weights",
    "ridge_solve",
]

Weighting = Literal["vote", "uniform"]


@dataclass(frozen=True)
class IIMConfig:
    """Hyper-parameters of the IIM engine.

    n_neighbors : k, imputation (and validation) neighbours.
    ell : ``"adaptive"`` (Alg. 3 over ``ell_grid``), a fixed int (Alg. 1), or ``"n"`` for
        the global model (GLR).
    ell_grid : candidate ell values for adaptive learning; ``None`` picks a grid from the
        data size (see :func:`auto_ell_grid`).
    alpha : ridge penalty, or several: each (ell, alpha) pair is then a candidate model.
    weights : ``"vote"`` (candidate-distance voting) or ``"uniform"`` (plain mean).
    include_global : add the global model (ell = n) to the adaptive candidates, so a row
        whose neighbourhood is too noisy for a local fit can fall back to GLR.
    validation : ``"loo"`` (default) scores a model on a validation tuple that is among its
        own learning neighbours by the leave-one-out residual ``e / (1 - h)`` (exact for
        ridge, h the leverage), so small ell is not favoured for fitting its own validation
        data; ``"paper"`` uses the plain in-sample residual of Alg. 3.
    """

    n_neighbors: int = 10
    ell: int | Literal["adaptive", "n"] = "adaptive"
    ell_grid: tuple[int, ...] | None = None
    alpha: float | tuple[float, ...] = 1e-3
    weights: Weighting = "vote"
    include_global: bool = True
    validation: Literal["loo", "paper"] = "loo"

    def alphas(self) -> np.ndarray:
        a = np.atleast_1d(np.asarray(self.alpha, dtype=np.float64))
        if a.ndim != 1 or a.size == 0 or np.any(~np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"alpha must be a non-negative float or a sequence of them, got "
                             f"{self.alpha!r}")
        return a


def auto_ell_grid(n: int, n_features: int) -> np.ndarray:
    """A default candidate grid for adaptive ell.

    1 (nearest-neighbour value), then roughly geometric steps from just above the number of
    coefficients up to ``min(n, max(200, 25 * (f + 1)))``: wide enough to reach smooth local
    fits, small enough that the cumulative Gram pass stays cheap.
    """
    lo = n_features + 2
    hi = min(n, max(200, 25 * (n_features + 1)))
    grid = [1]
    if hi >= lo:
        grid += list(np.unique(np.round(np.geomspace(lo, hi, num=10)).astype(int)))
    return np.unique(np.clip(np.asarray(grid, dtype=int), 1, max(n, 1)))


def ridge_solve(gram: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """Solve ridge systems from stacked augmented Gram matrices.

    ``gram`` has shape (..., p + 1, p + 1) over z = (1, features..., target); returns phi of
    shape (..., p) with phi = (U + alpha I)^-1 V, U = G[:p, :p], V = G[:p, p]. The intercept
    is penalised like the other coefficients, as in the paper's Formula 5. ``alpha`` is a
    scalar or an array broadcasting against the stack (one penalty per system).
    """
    p = gram.shape[-1] - 1
    a = np.asarray(alpha, dtype=np.float64)
    u = gram[..., :p, :p] + a[..., None, None] * np.eye(p)
    v = gram[..., :p, p]
    try:
        return np.linalg.solve(u, v[..., None])[..., 0]
    except np.linalg.LinAlgError:
        # alpha = 0 with a singular U: least-norm solution row by row.
        flat_u = u.reshape(-1, p, p)
        flat_v = v.reshape(-1, p)
        out = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(flat_u, flat_v,
                                                                               strict=True)])
        return out.reshape(v.shape)


def vote_weights(cand: np.ndarray, weights: Weighting = "vote") -> np.ndarray:
    """Combination weights for candidates of shape (q, k) (Formulas 10-11 of the paper).

    w_i is proportional to 1 / sum_j |c_i - c_j|; a row whose candidates are all equal gets
    uniform weights. Normalising by the smallest distance sum avoids overflow for nearly
    equal candidates.
    """
    q, k = cand.shape
    if weights == "uniform" or k <= 1:
        return np.full((q, k), 1.0 / max(k, 1))
    d = np.abs(cand[:, :, None] - cand[:, None, :]).sum(axis=2)
    dmin = d.min(axis=1, keepdims=True)
    equal = (dmin[:, 0] <= 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(equal[:, None], 1.0, dmin / d)
    w /= w.sum(axis=1, keepdims=True)
    return w


@dataclass
class PatternResult:
    """Imputations for the queries of one pattern."""

    values: np.ndarray  # (q,)
    spread: np.ndarray  # (q,) weighted std of the candidates
    neighbors: np.ndarray  # (q, k) training-row positions used
    ell: np.ndarray  # (q, k) chosen ell of each neighbour's model (0 = global)
    weights: np.ndarray  # (q, k)
    candidates: np.ndarray | None = None  # (q, k) the candidates c_i themselves

    @classmethod
    def vote(cls, cand: np.ndarray, neighbors: np.ndarray, ell: np.ndarray,
             weights: Weighting = "vote") -> PatternResult:
        """Combine candidates (q, k) into values and their weighted spread."""
        w = vote_weights(cand, weights)
        val = (w * cand).sum(axis=1)
        spread = np.sqrt((w * (cand - val[:, None]) ** 2).sum(axis=1))
        return cls(val, spread, neighbors, ell, w, cand)


@dataclass
class PatternModels:
    """Individual models for one (target, features) pattern over its training rows."""

    features: np.ndarray  # (n, f) training rows on F
    target: np.ndarray  # (n,) training rows on A
    config: IIMConfig
    _index: NeighborIndex = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float64)
        self.target = np.ascontiguousarray(self.target, dtype=np.float64)
        n, f = self.features.shape
        if n == 0:
            raise ValueError("a pattern needs at least one training row")
        self.n, self.f = n, f
        self._xaug = np.column_stack([np.ones(n), self.features])
        self._z = np.column_stack([self._xaug, self.target])
        self._index = NeighborIndex(self.features)
        self._alphas = self.config.alphas()
        self._phi = np.full((n, f + 1), np.nan)
        self._ell = np.zeros(n, dtype=np.int64)
        self._alpha = np.zeros(n)
        self._done = np.zeros(n, dtype=bool)
        self._val_pairs: tuple[np.ndarray, np.ndarray] | None = None
        self._global_phi: np.ndarray | None = None
        ell = self.config.ell
        if ell == "adaptive":
            grid = self.config.ell_grid
            g = auto_ell_grid(n, f) if grid is None else np.asarray(grid, dtype=int)
            if g.size == 0 or np.any(g < 1):
                raise ValueError(f"ell_grid must hold positive integers, got {grid!r}")
            g = np.unique(np.minimum(g, n))
            self._grid = g
            self._with_global = bool(self.config.include_global)
        elif ell == "n":
            self._grid = np.zeros(0, dtype=int)
            self._with_global = True
        else:
            if int(ell) < 1:
                raise ValueError(f"ell must be >= 1, 'adaptive' or 'n', got {ell!r}")
            self._grid = np.array([min(int(ell), n)])
            self._with_global = False

    # -- learning -----------------------------------------------------------------------
    @property
    def global_phi(self) -> np.ndarray:
        """Global ridge models (ell = n), one per alpha: shape (n_alpha, f + 1)."""
        if self._global_phi is None:
            g = self._z.T @ self._z
            self._global_phi = np.stack([ridge_solve(g, a) for a in self._alphas])
        return self._global_phi

    def candidate_labels(self) -> list[tuple[int, float]]:
        """(ell, alpha) of each candidate column; ell = 0 marks the global model."""
        labels = [(int(ell), float(a)) for ell in self._grid for a in self._alphas]
        if self._with_global:
            labels += [(0, float(a)) for a in self._alphas]
        return labels

    def candidate_models(self, rows: np.ndarray) -> np.ndarray:
        """All candidate models of ``rows``: shape (len(rows), n_candidates, f + 1).

        Incremental: one cumulative Gram matrix per row grows along its neighbour list, and
        the models of every candidate ell (and alpha) are solved from it in one batch.
        """
        return self._candidates(rows)[0]

    def _candidates(
        self, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(models, inverses of U + alpha I, rank limits, neighbour lists) of ``rows``.

        ``limit[c]``: a training row at position < limit[c] of the row's neighbour list is
        one of candidate c's learning tuples (0 for ell = 1, whose model is the row itself).
        """
        rows = np.asarray(rows, dtype=np.intp)
        r = len(rows)
        f1 = self.f + 1
        eye = np.eye(f1)
        phis, invs, limits = [], [], []
        nbr = np.zeros((r, 0), dtype=np.intp)
        if self._grid.size:
            lmax = int(self._grid[-1])
            _, nbr = self._index.query(self.features[rows], lmax)
            nbr = _self_first(nbr, rows)
            gram = np.zeros((r, f1 + 1, f1 + 1))
            prev = 0
            for ell in self._grid:
                blk = self._z[nbr[:, prev:ell]]  # (r, h, f + 2)
                gram += np.matmul(blk.transpose(0, 2, 1), blk)
                prev = int(ell)
                for a in self._alphas:
                    if ell == 1:
                        phi = np.zeros((r, f1))
                        phi[:, 0] = self.target[rows]
                        inv = np.zeros((r, f1, f1))
                        limits.append(0)
                    else:
                        inv = _stacked_inverse(gram[:, :f1, :f1] + a * eye)
                        phi = np.einsum("rij,rj->ri", inv, gram[:, :f1, f1])
                        limits.append(int(ell))
                    phis.append(phi)
                    invs.append(inv)
        if self._with_global:
            g = self._z.T @ self._z
            for a, phi_g in zip(self._alphas, self.global_phi, strict=True):
                phis.append(np.broadcast_to(phi_g, (r, f1)))
                inv = _stacked_inverse((g[:f1, :f1] + a * eye)[None])[0]
                invs.append(np.broadcast_to(inv, (r, f1, f1)))
                limits.append(self.n + 1)
        return np.stack(phis, axis=1), np.stack(invs, axis=1), np.asarray(limits), nbr

    def _validation_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(j, i) pairs: training row t_i is among the k nearest of t_j (t_j excluded)."""
        if self._val_pairs is None:
            k = min(self.config.n_neighbors, self.n - 1)
            if k <= 0:
                self._val_pairs = (np.zeros(0, np.intp), np.zeros(0, np.intp))
            else:
                _, nbr = self._index.query(self.features, k + 1)
                keep = nbr != np.arange(self.n)[:, None]
                no_self = keep.all(axis=1)
                keep[no_self, -1] = False
                i = nbr[keep].reshape(self.n, k)
                j = np.repeat(np.arange(self.n), k)
                self._val_pairs = (j, i.ravel())
        return self._val_pairs

    def validation_costs(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Alg. 3 costs: ``cost[r, c]`` = sum over validation tuples t_j that have ``rows[r]``
        among their k nearest of the squared error of candidate ``c``; plus how many t_j."""
        rows = np.asarray(rows, dtype=np.intp)
        return self._costs(rows, *self._candidates(rows))

    def _costs(self, rows: np.ndarray, cands: np.ndarray, invs: np.ndarray,
               limits: np.ndarray, nbr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        j, i = self._validation_pairs()
        pos = np.full(self.n, -1, dtype=np.intp)
        pos[rows] = np.arange(len(rows))
        sel = pos[i] >= 0
        j, p = j[sel], pos[i[sel]]
        xj = self._xaug[j]
        err = self.target[j][:, None] - np.einsum("pf,pcf->pc", xj, cands[p])
        if self.config.validation == "loo" and len(j):
            # Position of t_j in t_i's learning-neighbour list (beyond the list: never in).
            match = nbr[p] == j[:, None] if nbr.shape[1] else np.zeros((len(j), 0), bool)
            rank = np.where(match.any(axis=1), match.argmax(axis=1), self.n)
            inside = rank[:, None] < limits[None, :]
            lev = np.einsum("pf,pcfg,pg->pc", xj, invs[p], xj)
            err = np.where(inside, err / np.maximum(1.0 - lev, 1e-3), err)
        err = err**2
        cost = np.stack(
            [np.bincount(p, weights=err[:, c], minlength=len(rows))
             for c in range(cands.shape[1])],
            axis=1,
        )
        return cost, np.bincount(p, minlength=len(rows))

    def _learn(self, rows: np.ndarray) -> None:
        """Compute and cache the chosen model of each row in ``rows`` (not yet computed)."""
        if rows.size == 0:
            return
        cands, invs, limits, nbr = self._candidates(rows)  # (r, C, f + 1), ...
        labels = self.candidate_labels()
        n_c = len(labels)
        if n_c == 1:
            best = np.zeros(len(rows), dtype=np.intp)
        else:
            cost, n_val = self._costs(rows, cands, invs, limits, nbr)
            best = np.argmin(cost, axis=1)  # ties -> the smaller ell, as in the paper
            # A row that validates no one keeps the most stable candidate: the global model
            # when it is offered, else the largest ell.
            best[n_val == 0] = n_c - 1 if self._with_global else (
                (len(self._grid) - 1) * len(self._alphas)
            )
        self._phi[rows] = cands[np.arange(len(rows)), best]
        self._ell[rows] = [labels[b][0] for b in best]
        self._alpha[rows] = [labels[b][1] for b in best]
        self._done[rows] = True

    def models(self, rows: np.ndarray) -> np.ndarray:
        """Chosen models phi of ``rows`` (learned on first use, then cached)."""
        rows = np.asarray(rows, dtype=np.intp)
        todo = np.unique(rows[~self._done[rows]])
        self._learn(todo)
        return self._phi[rows]

    def chosen_ell(self, rows: np.ndarray) -> np.ndarray:
        """The ell chosen for each of ``rows`` (0 = global model); learns them if needed."""
        self.models(rows)
        return self._ell[np.asarray(rows, dtype=np.intp)]

    # -- imputation ---------------------------------------------------------------------
    def impute(self, queries: np.ndarray, exclude: np.ndarray | None = None) -> PatternResult:
        """Impute the target for query rows given on F (Alg. 2).

        ``exclude[q]`` (optional) is a training row that query q may not use as a
        neighbour: imputing training rows themselves for validation, without seeing them.
        """
        queries = np.asarray(queries, dtype=np.float64)
        k = min(self.config.n_neighbors, self.n)
        if exclude is None:
            _, nbr = self._index.query(queries, k)
        else:
            k = min(k, self.n - 1)
            if k <= 0:
                raise ValueError("excluding a row leaves no training row to impute from")
            _, nbr = self._index.query(queries, k + 1)
            keep = nbr != np.asarray(exclude)[:, None]
            keep[keep.all(axis=1), -1] = False
            nbr = nbr[keep].reshape(len(queries), k)
        phi = self.models(nbr.ravel()).reshape(len(queries), k, self.f + 1)
        qaug = np.column_stack([np.ones(len(queries)), queries])
        cand = np.einsum("qf,qkf->qk", qaug, phi)
        return PatternResult.vote(cand, nbr, self._ell[nbr], self.config.weights)


def _stacked_inverse(a: np.ndarray) -> np.ndarray:
    """Inverses of stacked matrices; pseudo-inverse where one is singular (alpha = 0)."""
    try:
        return np.linalg.inv(a)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a)


def _self_first(nbr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Put each row itself first in its neighbour list (duplicates may have displaced it)."""
    first_ok = nbr[:, 0] == rows
    if np.all(first_ok):
        return nbr
    nbr = nbr.copy()
    for r in np.flatnonzero(~first_ok):
        lst = nbr[r]
        where = np.flatnonzero(lst == rows[r])
        rest = np.delete(lst, where[0]) if where.size else lst[:-1]
        nbr[r] = np.concatenate([[rows[r]], rest])
    return nbr
