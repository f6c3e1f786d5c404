"""IIM — Imputation via Individual Models (Zhang, Song, Sun, Wang; ICDE 2019), centralized.

One *pattern* is a pair (target attribute A, observed feature set F). For a pattern, every
training row t_i (observed on F and A) gets an individual ridge model phi_i learned on its
ell nearest training rows on F (t_i itself first):

    phi_i = (X^T X + alpha I)^-1 X^T Y,   X = [1, t[F]],  Y = t[A];   ell = 1 -> (t_i[A], 0, ..)

* Adaptive ell (Alg. 3): every training row t_j is a validation tuple; each of its k nearest
  rows t_i (t_j excluded) is charged ``(t_j[A] - (1, t_j[F]) phi_i^(ell))^2`` for every
  candidate ell; t_i keeps the candidate of least cost. By default the residual is the exact
  leave-one-out one when t_j is among t_i's own ell learning neighbours (the paper's
  in-sample residual rewards small ell for fitting its validation tuples; see
  benchmarks/README.md). The candidates may also include
  several ridge alphas and the global model (ell = n), chosen the same way.
* Incremental learning (Prop. 3): U^(ell+h) = U^(ell) + dX^T dX and V likewise, i.e. a
  cumulative Gram matrix along each row's sorted neighbour list, so the cost per candidate
  does not grow with ell. All solves are batched (stacked ``np.linalg.solve``).
* Beyond the paper, chosen by the same validation: local quadratic models at large ell
  (:mod:`fediim.impute.basis`), and per small pattern a blend of IIM with the global model
  and the mean checked on held-out rows (:mod:`fediim.impute.pattern_choice`); with
  ``trees`` every pattern of enough rows also weighs two global tree ensembles in that
  blend (:mod:`fediim.impute.tree_models`), so the engine is then a validated stack.
* Imputation (Alg. 2): the k nearest training rows of the query give candidates
  c_i = (1, t_x[F]) phi_i, combined with weights w_i proportional to 1 / sum_j |c_i - c_j|
  (all candidates equal -> plain mean).

Models are computed lazily, only for the training rows that some query actually uses as an
imputation neighbour, and cached: fitting is cheap, and repeated transforms reuse models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from fediim.impute.basis import MIN_ROWS_PER_COEFFICIENT, offers_quadratic, quadratic_terms
from fediim.impute.neighbors import IndexMethod, NeighborIndex
from fediim.impute.pattern_choice import IIM_ONLY, Blend, choose_blend, first_least
from fediim.impute.voting import Weighting, vote_weights

#: Up to this many training rows, every row is a validation tuple (exact Alg. 3).
FULL_VALIDATION_ROWS = 50_000
#: Above it, the validation tuples are the rows among this many times k nearest of the rows
#: being learned.
VALIDATION_RANKS = 0.5
#: Above it, models are learned this many rows at a time (peak memory grows with it).
LEARN_CHUNK_ROWS = 1024

__all__ = [
    "Candidates",
    "IIMConfig",
    "PatternModels",
    "auto_ell_grid",
    "vote_weights",
    "ridge_solve",
]

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
    blend : with adaptive ell, let held-out validation blend IIM with the global model and
        the mean per pattern (see :mod:`fediim.impute.pattern_choice`).
    quadratic : with adaptive ell, also offer each row local quadratic models at large
        ell (see :mod:`fediim.impute.basis`).
    trees : with ``blend``, also weigh two global tree ensembles in the blend, per pattern
        of enough rows, by the same held-out check (see :mod:`fediim.impute.tree_models`).
    """

    n_neighbors: int = 10
    ell: int | Literal["adaptive", "n"] = "adaptive"
    ell_grid: tuple[int, ...] | None = None
    alpha: float | tuple[float, ...] = 1e-3
    weights: Weighting = "vote"
    include_global: bool = True
    validation: Literal["loo", "paper"] = "loo"
    neighbor_index: IndexMethod = "auto"
    blend: bool = True
    quadratic: bool = True
    trees: bool = False

    def alphas(self) -> np.ndarray:
        """The ridge penalties as a checked 1-D array."""
        alphas = np.atleast_1d(np.asarray(self.alpha, dtype=np.float64))
        if (alphas.ndim != 1 or alphas.size == 0 or np.any(~np.isfinite(alphas))
                or np.any(alphas < 0)):
            raise ValueError(f"alpha must be a non-negative float or a sequence of them, got "
                             f"{self.alpha!r}")
        return alphas


def auto_ell_grid(n_rows: int, n_features: int) -> np.ndarray:
    """A default candidate grid for adaptive ell.

    1 (nearest-neighbour value), then roughly geometric steps from just above the number of
    coefficients up to ``min(n, max(200, 25 * (f + 1)))``: wide enough to reach smooth local
    fits, small enough that the cumulative Gram pass stays cheap.
    """
    smallest = n_features + 2
    largest = min(n_rows, max(200, 25 * (n_features + 1)))
    grid = [1]
    if largest >= smallest:
        grid += list(np.unique(np.round(np.geomspace(smallest, largest, num=10)).astype(int)))
    return np.unique(np.clip(np.asarray(grid, dtype=int), 1, max(n_rows, 1)))


def ridge_solve(gram: np.ndarray, alpha: float | np.ndarray,
                prior: np.ndarray | None = None) -> np.ndarray:
    """Solve ridge systems from stacked augmented Gram matrices.

    ``gram`` has shape (..., p + 1, p + 1) over z = (1, features..., target); returns phi of
    shape (..., p) with phi = (U + alpha I)^-1 V, U = G[:p, :p], V = G[:p, p]. The intercept
    is penalised like the other coefficients, as in the paper's Formula 5. ``alpha`` is a
    scalar or an array broadcasting against the stack (one penalty per system). With a
    ``prior`` of shape (p,) the penalty shrinks towards it instead of towards zero:
    phi = (U + alpha I)^-1 (V + alpha prior).
    """
    size = gram.shape[-1] - 1
    penalty = np.asarray(alpha, dtype=np.float64)
    lhs = gram[..., :size, :size] + penalty[..., None, None] * np.eye(size)
    rhs = gram[..., :size, size]
    if prior is not None:
        rhs = rhs + penalty[..., None] * np.asarray(prior, dtype=np.float64)
    try:
        return np.linalg.solve(lhs, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        # alpha = 0 with a singular U: least-norm solution system by system.
        solutions = [np.linalg.lstsq(matrix, vector, rcond=None)[0] for matrix, vector in
                     zip(lhs.reshape(-1, size, size), rhs.reshape(-1, size), strict=True)]
        return np.stack(solutions).reshape(rhs.shape)


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
        vote = vote_weights(cand, weights)
        values = (vote * cand).sum(axis=1)
        spread = np.sqrt((vote * (cand - values[:, None]) ** 2).sum(axis=1))
        return cls(values, spread, neighbors, ell, vote, cand)


@dataclass(frozen=True)
class Candidates:
    """The candidate models of some training rows, and what validating them needs.

    models : (rows, candidates, f + 1), in the order of
        :meth:`PatternModels.candidate_labels`.
    inverses : (rows, candidates, f + 1, f + 1), each model's ``(U + alpha I)^-1`` (zeros
        for ell = 1, whose model is the row's own value).
    limits : (candidates,), a training row at position < ``limits[c]`` of a row's
        neighbour list is one of candidate c's learning tuples (0 for ell = 1).
    neighbors : (rows, largest ell), each row's neighbour list, the row itself first.
    sizes : (candidates,), how many leading coefficients each candidate uses (the rest
        are zeros: a linear model among quadratic ones); ``None``: all.
    """

    models: np.ndarray
    inverses: np.ndarray
    limits: np.ndarray
    neighbors: np.ndarray
    sizes: np.ndarray | None = None


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
        n_rows, n_features = self.features.shape
        if n_rows == 0:
            raise ValueError("a pattern needs at least one training row")
        self.n_rows, self.n_features = n_rows, n_features
        self._quadratic = bool(self.config.quadratic and self.config.ell == "adaptive"
                               and offers_quadratic(n_rows, n_features))
        self._xaug = self._augment(self.features)
        # z = (1, t[F], t[A], quadratic terms): the linear system is its leading block.
        self._z = np.column_stack([self._xaug[:, :n_features + 1], self.target,
                                   self._xaug[:, n_features + 1:]])
        self.width = self._xaug.shape[1]
        # Adaptive ell up to FULL_VALIDATION_ROWS validates every row: n queries.
        full_validation = self.config.ell == "adaptive" and n_rows <= FULL_VALIDATION_ROWS
        self._index = NeighborIndex(self.features, self.config.neighbor_index,
                                    k_hint=self.config.n_neighbors,
                                    n_queries=n_rows if full_validation else None,
                                    bounded=self.config.ell == "adaptive" and not full_validation)
        self._alphas = self.config.alphas()
        self._phi = np.full((n_rows, self.width), np.nan)
        self._ell = np.zeros(n_rows, dtype=np.int64)
        self._alpha = np.zeros(n_rows)
        self._done = np.zeros(n_rows, dtype=bool)
        self._choice = np.zeros(n_rows, dtype=np.intp)  # column of the chosen candidate
        self._val_pairs: tuple[np.ndarray, np.ndarray] | None = None
        self._global_phi: np.ndarray | None = None
        self._grid, self._with_global = self._ell_candidates()
        self._blend: Blend | None = None

    def _augment(self, features: np.ndarray) -> np.ndarray:
        """Rows on F as (1, t[F]), plus their quadratic terms with ``quadratic``."""
        columns = [np.ones(len(features)), features]
        if self._quadratic:
            columns.append(quadratic_terms(features))
        return np.column_stack(columns)

    def _pad(self, array: np.ndarray, axes: int) -> np.ndarray:
        """A linear model (or inverse: ``axes=2``) with zeros for the quadratic terms."""
        missing = self.width - array.shape[-1]
        if not missing:
            return array
        return np.pad(array, [(0, 0)] * (array.ndim - axes) + [(0, missing)] * axes)

    def _ell_candidates(self) -> tuple[np.ndarray, bool]:
        """The local ells a row's model is chosen from, and whether the global model is
        a candidate too."""
        ell = self.config.ell
        if ell == "adaptive":
            grid = self.config.ell_grid
            values = (auto_ell_grid(self.n_rows, self.n_features) if grid is None
                      else np.asarray(grid, dtype=int))
            if values.size == 0 or np.any(values < 1):
                raise ValueError(f"ell_grid must hold positive integers, got {grid!r}")
            return np.unique(np.minimum(values, self.n_rows)), bool(self.config.include_global)
        if ell == "n":
            return np.zeros(0, dtype=int), True
        if int(ell) < 1:
            raise ValueError(f"ell must be >= 1, 'adaptive' or 'n', got {ell!r}")
        return np.array([min(int(ell), self.n_rows)]), False

    # -- learning -----------------------------------------------------------------------
    @cached_property
    def global_gram(self) -> np.ndarray:
        """``Z^T Z`` over every training row, Z = (1, features, target, quadratic terms):
        its leading (f + 2) block is the global linear model's Gram matrix, computed once."""
        return self._z.T @ self._z

    @property
    def global_phi(self) -> np.ndarray:
        """Global linear ridge models (ell = n), one per alpha: shape (n_alpha, width)."""
        if self._global_phi is None:
            gram = self.global_gram[:self.n_features + 2, :self.n_features + 2]
            self._global_phi = self._pad(
                np.stack([ridge_solve(gram, alpha) for alpha in self._alphas]), 1)
        return self._global_phi

    def candidate_labels(self) -> list[tuple[int, float]]:
        """(ell, alpha) of each candidate column; ell = 0 marks the global model."""
        return [(abs(ell), alpha) for ell, alpha in self._labels_with_kind()]

    def _labels_with_kind(self) -> list[tuple[int, float]]:
        """:meth:`candidate_labels` with a quadratic model's ell negated."""
        labels = []
        for ell in self._grid:
            labels += [(int(ell), float(alpha)) for alpha in self._alphas]
            labels += [(-int(ell), float(alpha))
                       for alpha in self._alphas[:self._n_quadratic(ell)]]
        if self._with_global:
            labels += [(0, float(alpha)) for alpha in self._alphas]
        return labels

    def _n_quadratic(self, ell: int) -> int:
        """How many quadratic models (one per alpha) a row gets at this ell."""
        enough = ell >= MIN_ROWS_PER_COEFFICIENT * self.width
        return len(self._alphas) if self._quadratic and enough else 0

    def candidates(self, rows: np.ndarray) -> Candidates:
        """Every candidate model of ``rows`` (see :class:`Candidates`).

        Incremental: one cumulative Gram matrix per row grows along its neighbour list, and
        the models of every candidate ell (and alpha) are solved from it in one batch.
        """
        rows = np.asarray(rows, dtype=np.intp)
        models, inverses, limits, neighbors = self._local_candidates(rows)
        if self._with_global:
            width = self.n_features + 1
            gram = self.global_gram
            eye = np.eye(width)
            for alpha, phi in zip(self._alphas, self.global_phi, strict=True):
                models.append(np.broadcast_to(phi, (len(rows), self.width)))
                inverse = self._pad(
                    _stacked_inverse((gram[:width, :width] + alpha * eye)[None])[0], 2)
                inverses.append(np.broadcast_to(inverse, (len(rows), self.width, self.width)))
                limits.append(self.n_rows + 1)
        sizes = [self.width if label[0] < 0 else self.n_features + 1 for label in
                 self._labels_with_kind()]
        return Candidates(np.stack(models, axis=1), np.stack(inverses, axis=1),
                          np.asarray(limits), neighbors, np.asarray(sizes))

    def _local_candidates(self, rows: np.ndarray
                          ) -> tuple[list[np.ndarray], list[np.ndarray], list[int], np.ndarray]:
        """The local part of :meth:`candidates`: per ell of the grid and alpha, the models,
        their inverses and limits (as lists), and the rows' neighbour lists."""
        width = self.n_features + 1
        eye = np.eye(width)
        models: list[np.ndarray] = []
        inverses: list[np.ndarray] = []
        limits: list[int] = []
        if not self._grid.size:
            return models, inverses, limits, np.zeros((len(rows), 0), dtype=np.intp)
        _, neighbors = self._index.query(self.features[rows], int(self._grid[-1]))
        neighbors = _self_first(neighbors, rows)
        gram = np.zeros((len(rows), self.width + 1, self.width + 1))
        pooled = 0
        for ell in self._grid:
            block = self._z[neighbors[:, pooled:ell]]  # (rows, new neighbours, f + 2)
            gram += np.matmul(block.transpose(0, 2, 1), block)
            pooled = int(ell)
            for alpha in self._alphas:
                if ell == 1:
                    phi = np.zeros((len(rows), width))
                    phi[:, 0] = self.target[rows]
                    inverse = np.zeros((len(rows), width, width))
                    limits.append(0)
                else:
                    inverse = _stacked_inverse(gram[:, :width, :width] + alpha * eye)
                    phi = np.einsum("rij,rj->ri", inverse, gram[:, :width, width])
                    limits.append(int(ell))
                models.append(self._pad(phi, 1))
                inverses.append(self._pad(inverse, 2))
            for alpha in self._alphas[:self._n_quadratic(int(ell))]:
                phi, inverse = self._quadratic_models(gram, float(alpha))
                models.append(phi)
                inverses.append(inverse)
                limits.append(int(ell))
        return models, inverses, limits, neighbors

    def _quadratic_models(self, gram: np.ndarray, alpha: float
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Quadratic ridge models from stacked Grams over z, and their inverses."""
        regressors = np.r_[0:self.n_features + 1, self.n_features + 2:self.width + 1]
        lhs = gram[:, regressors[:, None], regressors[None, :]] + alpha * np.eye(self.width)
        inverse = _stacked_inverse(lhs)
        return np.einsum("rij,rj->ri", inverse, gram[:, regressors, self.n_features + 1]), \
            inverse

    def _validation_pairs(self, rows: np.ndarray, neighbors: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(validated, model) pairs of training rows: ``model`` is among the k nearest
        other rows of ``validated``, so its models are charged for ``validated``'s error.

        Up to :data:`FULL_VALIDATION_ROWS` training rows every row validates (exact Alg. 3,
        computed once for all rows). Above, the work is bounded by the rows being learned:
        the validation tuples are the :data:`VALIDATION_RANKS` x k nearest rows of the
        rows being learned (from ``neighbors``, each row's list, itself first), whose own
        k nearest are found exactly; a model is charged for those that have it among
        them. A farther row seldom has it among its k nearest (NRMSE against the exact
        rule in benchmarks/README.md). A model's tuples thus come from the neighbourhood
        of the rows learned with it (a chunk of :meth:`chosen_models`)."""
        n_nearest = min(self.config.n_neighbors, self.n_rows - 1)
        if n_nearest <= 0:
            return np.zeros(0, np.intp), np.zeros(0, np.intp)
        if self.n_rows <= FULL_VALIDATION_ROWS:
            if self._val_pairs is None:
                nearest = self._index.nearest_others(n_nearest)
                self._val_pairs = (np.repeat(np.arange(self.n_rows), n_nearest),
                                   nearest.ravel())
            return self._val_pairs
        ranks = max(2, int(round(VALIDATION_RANKS * n_nearest)) + 1)
        if neighbors.shape[1] < ranks:
            neighbors = self._index.query(self.features[rows], ranks)[1]
        tuples = np.unique(neighbors[:, 1:ranks])
        nearest = self._index.nearest_others(n_nearest, tuples)
        return np.repeat(tuples, n_nearest), nearest.ravel()

    def validation_costs(self, rows: np.ndarray, candidates: Candidates
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Alg. 3 costs of the ``candidates`` of ``rows``: ``cost[r, c]`` sums, over the
        validation tuples t_j that have ``rows[r]`` among their k nearest, the squared
        error of candidate c on t_j; and how many t_j each row has."""
        rows = np.asarray(rows, dtype=np.intp)
        validated, model = self._validation_pairs(rows, candidates.neighbors)
        position = np.full(self.n_rows, -1, dtype=np.intp)
        position[rows] = np.arange(len(rows))
        selected = position[model] >= 0
        validated, owner = validated[selected], position[model[selected]]
        errors = self.pair_errors(validated, owner, candidates) ** 2
        cost = np.stack(
            [np.bincount(owner, weights=errors[:, column], minlength=len(rows))
             for column in range(candidates.models.shape[1])],
            axis=1,
        )
        return cost, np.bincount(owner, minlength=len(rows))

    def pair_errors(self, validated: np.ndarray, owner: np.ndarray, candidates: Candidates
                    ) -> np.ndarray:
        """Signed error of every candidate of row ``owner[p]`` (a position in
        ``candidates``) on training row ``validated[p]``, shape (pairs, candidates); with
        ``validation="loo"``, the leave-one-out residual where t_j is a learning tuple."""
        errors = self.target[validated][:, None] - np.einsum(
            "pf,pcf->pc", self._xaug[validated], candidates.models[owner])
        if self.config.validation == "loo" and len(validated):
            errors = self._leave_one_out(errors, validated, owner, candidates)
        return errors

    def _leave_one_out(self, errors: np.ndarray, validated: np.ndarray, owner: np.ndarray,
                       candidates: Candidates) -> np.ndarray:
        """Where a validation tuple is one of the model's own learning tuples, its error
        as the exact ridge leave-one-out residual ``e / (1 - h)`` (h its leverage)."""
        neighbors = candidates.neighbors
        # Position of t_j in t_i's learning-neighbour list (beyond the list: never in).
        rank = np.full(len(validated), self.n_rows)  # no lists (global models only): all in
        if neighbors.shape[1]:
            match = neighbors[owner] == validated[:, None]
            rank = np.where(match.any(axis=1), match.argmax(axis=1), self.n_rows)
        inside = rank[:, None] < candidates.limits[None, :]
        errors = errors.copy()
        x_validated = self._xaug[validated]
        for column in range(errors.shape[1]):
            pairs = np.flatnonzero(inside[:, column])
            if not pairs.size:
                continue
            size = self.width if candidates.sizes is None else int(candidates.sizes[column])
            inverse = candidates.inverses[:, column, :size, :size]
            x_pairs = x_validated[pairs, :size]
            if candidates.limits[column] > self.n_rows:  # the global model: one inverse
                projected = x_pairs @ inverse[0]
            else:  # one matrix per pair, gathered one candidate at a time (memory)
                projected = np.matmul(inverse[owner[pairs]], x_pairs[:, :, None])[:, :, 0]
            leverage = (projected * x_pairs).sum(axis=1)
            errors[pairs, column] /= np.maximum(1.0 - leverage, 1e-3)
        return errors

    def _learn(self, rows: np.ndarray) -> None:
        """Compute and cache the chosen model of each row in ``rows`` (not yet computed)."""
        if rows.size:
            self.learn(rows)

    def learn(self, rows: np.ndarray) -> tuple[Candidates, np.ndarray]:
        """Choose (and cache) the model of each of ``rows`` by validation; returns the
        rows' candidates and the column of each row's chosen one."""
        rows = np.asarray(rows, dtype=np.intp)
        candidates = self.candidates(rows)
        labels = self.candidate_labels()
        if len(labels) == 1:
            best = np.zeros(len(rows), dtype=np.intp)
        else:
            cost, n_validated = self.validation_costs(rows, candidates)
            best = first_least(cost)  # ties -> the smaller ell, as in the paper
            # A row that validates no one keeps the most stable candidate: the global model
            # when it is offered, else the largest ell.
            best[n_validated == 0] = len(labels) - 1 if self._with_global else labels.index(
                (int(self._grid[-1]), float(self._alphas[0])))
        self._phi[rows] = candidates.models[np.arange(len(rows)), best]
        self._ell[rows] = [labels[choice][0] for choice in best]
        self._alpha[rows] = [labels[choice][1] for choice in best]
        self._choice[rows] = best
        self._done[rows] = True
        return candidates, best

    def chosen_models(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The chosen model phi of each of ``rows`` and its ell (0 = the global model),
        learned on first use, then cached."""
        rows = np.asarray(rows, dtype=np.intp)
        pending = rows[~self._done[rows]]
        if self.n_rows <= FULL_VALIDATION_ROWS:
            self._learn(np.unique(pending))
        else:
            # Bounded memory: chunks of rows in order of first use, so that a chunk holds
            # the neighbours of a few queries and its validation tuples overlap little with
            # other chunks'.
            _, first = np.unique(pending, return_index=True)
            pending = pending[np.sort(first)]
            for start in range(0, len(pending), LEARN_CHUNK_ROWS):
                self._learn(pending[start : start + LEARN_CHUNK_ROWS])
        return self._phi[rows], self._ell[rows]

    def nearest_others_of(self, rows: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` nearest other training rows of each training row in ``rows``
        (``0 < k < n``), nearest first."""
        _, neighbors = self._index.query(self.features[rows], k + 1)
        keep = neighbors != np.asarray(rows)[:, None]
        keep[keep.all(axis=1), -1] = False
        return neighbors[keep].reshape(len(rows), k)

    def augmented(self, rows: np.ndarray) -> np.ndarray:
        """Training rows as (1, t[F])."""
        return self._xaug[rows]

    def global_model(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """The global linear ridge model at penalty ``alpha`` and its
        ``(U + alpha I)^-1`` (zeros for the quadratic terms)."""
        width = self.n_features + 1
        gram = self.global_gram
        inverse = _stacked_inverse((gram[:width, :width] + alpha * np.eye(width))[None])[0]
        return self._pad(inverse @ gram[:width, width], 1), self._pad(inverse, 2)

    @property
    def blend(self) -> Blend:
        """The weights of IIM, the global model and the mean in the pattern's imputations:
        IIM alone unless held-out validation says otherwise (only with adaptive ell and
        ``config.blend``)."""
        if self._blend is None:
            chooses = self.config.blend and self.config.ell == "adaptive"
            self._blend = choose_blend(self) if chooses else IIM_ONLY
        return self._blend

    def validation_mse(self, rows: np.ndarray) -> np.ndarray:
        """Each row's chosen model's mean squared validation residual (Alg. 3's cost of
        the chosen candidate per validation tuple, leave-one-out where configured), in
        standardized target units; NaN for a row that validates no tuple. The residual
        variance that multiple imputation adds to a draw (:mod:`fediim.impute.multiple`)."""
        rows = np.asarray(rows, dtype=np.intp)
        self.chosen_models(rows)
        if not self._grid.size:  # the global model alone: its leave-one-out residuals
            return np.full(len(rows), self._global_loo_mse(float(self._alpha[rows[0]])))
        unique, inverse = np.unique(rows, return_inverse=True)
        cost, n_validated = self.validation_costs(unique, self.candidates(unique))
        with np.errstate(invalid="ignore", divide="ignore"):
            mse = cost[np.arange(len(unique)), self._choice[unique]] / n_validated
        return np.where(n_validated > 0, mse, np.nan)[inverse.ravel()]

    def _global_loo_mse(self, alpha: float) -> float:
        """Mean squared leave-one-out residual of the global ridge model at ``alpha``."""
        width = self.n_features + 1
        gram = self.global_gram
        inverse = _stacked_inverse((gram[:width, :width] + alpha * np.eye(width))[None])[0]
        phi = inverse @ gram[:width, width]
        linear = self._xaug[:, :width]
        leverage = np.einsum("nf,fg,ng->n", linear, inverse, linear)
        residuals = (self.target - linear @ phi) / np.maximum(1.0 - leverage, 1e-3)
        return float(np.mean(residuals**2))

    # -- imputation ---------------------------------------------------------------------
    def impute(self, queries: np.ndarray) -> PatternResult:
        """Impute the target for query rows given on F: Alg. 2, blended with the
        pattern's global model and mean where :attr:`blend` says so."""
        queries = np.asarray(queries, dtype=np.float64)
        if not self.blend.iim_only:
            return self._impute_blended(queries)
        return self._impute_by_vote(queries)

    def _impute_by_vote(self, queries: np.ndarray) -> PatternResult:
        """Alg. 2: the vote of the query's k nearest training rows' chosen models."""
        n_nearest = min(self.config.n_neighbors, self.n_rows)
        _, neighbors = self._index.query(queries, n_nearest)
        phi, ell = self.chosen_models(neighbors.ravel())
        phi = phi.reshape(len(queries), n_nearest, self.width)
        queries_augmented = self._augment(queries)
        candidates = np.einsum("qf,qkf->qk", queries_augmented, phi)
        return PatternResult.vote(candidates, neighbors, ell.reshape(neighbors.shape),
                                  self.config.weights)

    def _impute_blended(self, queries: np.ndarray) -> PatternResult:
        """The :attr:`blend` of IIM's vote, the global model, the mean (and the tree
        ensembles) for each query; its spread counts the parts' disagreement, ell is IIM's
        weighted by its share (0 marks the other parts), and each candidate is an IIM
        candidate blended likewise, under IIM's vote weights."""
        weights = self.blend.weights
        phi, _ = self.global_model(self.blend.global_alpha)
        # einsum, not a matrix product: a row's value must not depend on its batch (BLAS
        # sums a single row and a block of rows in different orders).
        parts = [np.einsum("qf,f->q", self._augment(queries), phi),
                 np.full(len(queries), self.target.mean())]
        if self.blend.trees is not None:
            parts += list(self.blend.trees.predict(queries))
        spreads = [np.zeros(len(queries))] * len(parts)
        if weights[0] > 0:
            found = self._impute_by_vote(queries)
            parts.insert(0, found.values)
            spreads.insert(0, found.spread)
            neighbors, ell = found.neighbors, found.ell * weights[0]
            votes, iim_candidates = found.weights, found.candidates
        else:
            parts.insert(0, np.zeros(len(queries)))
            spreads.insert(0, np.zeros(len(queries)))
            neighbors = self._index.query(queries, 1)[1]
            ell = np.zeros_like(neighbors, dtype=np.float64)
            votes, iim_candidates = np.ones(neighbors.shape), np.zeros(neighbors.shape)
        weights = weights[:len(parts)]  # no trees kept: their weights are zero
        values = sum(weight * part for weight, part in zip(weights, parts, strict=True))
        spread = np.sqrt(sum(weight * (part_spread**2 + (part - values) ** 2) for
                             weight, part, part_spread in zip(weights, parts, spreads,
                                                              strict=True)))
        # Each IIM candidate blended with the same other parts: their vote is ``values``,
        # and multiple imputation draws among them (fediim.impute.multiple).
        assert iim_candidates is not None
        others = sum(weight * part for weight, part in zip(weights[1:], parts[1:],
                                                            strict=True))
        candidates = weights[0] * iim_candidates + np.asarray(others)[:, None]
        return PatternResult(values, spread, neighbors, ell, votes, candidates)


def _stacked_inverse(matrices: np.ndarray) -> np.ndarray:
    """Inverses of stacked matrices; pseudo-inverse where one is singular (alpha = 0)."""
    try:
        return np.linalg.inv(matrices)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(matrices)


def _self_first(neighbors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Put each row itself first in its neighbour list (duplicates may have displaced it)."""
    first_ok = neighbors[:, 0] == rows
    if np.all(first_ok):
        return neighbors
    neighbors = neighbors.copy()
    for number in np.flatnonzero(~first_ok):
        listed = neighbors[number]
        where = np.flatnonzero(listed == rows[number])
        rest = np.delete(listed, where[0]) if where.size else listed[:-1]
        neighbors[number] = np.concatenate([[rows[number]], rest])
    return neighbors
