"""``IIMImputer``: the centralized IIM engine behind a scikit-learn transformer interface."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from fediim.impute.encoding import fit_encoding, table_codes
from fediim.impute.iim import IIMConfig, PatternModels
from fediim.impute.multiple import draw_imputations
from fediim.impute.neighbors import INDEX_METHODS
from fediim.io.result import METHOD_IIM, METHOD_MEAN, ImputationResult

__all__ = ["IIMImputer", "ImputationResult", "empty_result", "glr_imputer", "knn_imputer",
           "missing_patterns"]

#: Rows of one missingness pattern imputed at a time (each query holds k models).
IMPUTE_CHUNK_ROWS = 16_384
#: Training rows, over all patterns, whose models an imputer keeps between calls; the least
#: recently used patterns beyond it are dropped (and rebuilt when needed again).
PATTERN_CACHE_ROWS = 2_000_000


class IIMImputer(TransformerMixin, BaseEstimator):
    """Impute missing values with IIM, Imputation via Individual Models.

    For each missing cell, the k nearest complete rows (on the cell's observed attributes)
    each predict the value with their own ridge model, learned on their ell nearest rows;
    the candidates are combined by candidate-distance voting. ell is chosen per row by
    validation (``ell="adaptive"``), which lets each row pick anything between
    nearest-neighbour imputation (ell = 1) and global regression (ell = n).

    Parameters
    ----------
    n_neighbors : int, default=10
        k, the number of imputation (and validation) neighbours.
    ell : "adaptive", int or "n", default="adaptive"
        Learning neighbours per individual model. ``1`` with ``weights="uniform"`` is kNN
        imputation; ``"n"`` is global ridge regression (GLR).
    ell_grid : sequence of int, optional
        Candidate ell values for adaptive learning (default: a grid from the data size).
    alpha : float or sequence of float, default=1e-3
        Ridge penalty. Several values make each (ell, alpha) pair a candidate model.
    weights : {"vote", "uniform"}, default="vote"
        Candidate-distance voting (the paper's Formula 10) or a plain mean.
    include_global : bool, default=True
        Offer the global model as an adaptive candidate.
    scale : bool, default=True
        z-score attributes (with the fitted mean/std) before neighbour search and learning.
        ``False`` uses raw distances, as the authors' reference code does.
    validation : {"loo", "paper"}, default="loo"
        How adaptive ell scores a model on a validation tuple that is one of its own
        learning neighbours: the exact leave-one-out ridge residual, or the paper's
        in-sample residual (Alg. 3 as published).
    column_kinds : mapping, optional
        Coded columns, ``{column: kind}`` or ``{column: (kind, levels)}`` with ``column`` a
        name or position and ``kind`` one of "numeric", "binary", "categorical",
        "ordinal"; a coded kind without levels takes the labels seen by ``fit``. Pandas
        ``category`` columns are categorical (ordered: ordinal) unless listed. Labels may
        be numbers or strings; they are encoded as described in
        :mod:`fediim.impute.encoding`, every imputed coded cell is a declared level, and
        :meth:`impute` gives the winning level's probability.
    n_imputations : int, default=1
        M, the completed tables :meth:`multiple_imputations` draws from the predictive
        distribution (see :mod:`fediim.impute.multiple`; a coded cell draws its level
        from its level probabilities). ``transform`` and ``impute``
        always give the single best estimate, whatever M.
    random_state : int, numpy Generator or None, default=None
        Seeds the draws of :meth:`multiple_imputations` (an int gives the same draws on
        every call); the single imputation uses no randomness.
    neighbor_index : {"auto", "kdtree", "blas", "hnsw"}, default="auto"
        The neighbour search. ``"auto"`` follows a measured rule: faiss's approximate
        HNSW graph (the ``approx`` extra) only for wide patterns whose every row is
        validated, else exact (KD-tree or blocked BLAS by width); an approximate index
        below its recall check falls back to the exact search (see
        :mod:`fediim.impute.neighbors`).
    blend : bool, default=True
        With adaptive ell, check each (target, features) pattern's IIM on held-out
        training rows against its global model and its mean, and impute with the blend
        of the three that errs least (see :mod:`fediim.impute.pattern_choice`): IIM's
        per-row validation is optimistic when training rows are few.
    quadratic : bool, default=True
        With adaptive ell, also offer each row local quadratic models at large ell,
        chosen per row by the same validation (see :mod:`fediim.impute.basis`).
    trees : bool, default=False
        Opt-in, for accuracy at several times the CPU (2-12x on the paper datasets, see
        benchmarks/README.md). With ``blend``, every pattern of at least 100 training
        rows also fits two global tree ensembles (scikit-learn's gradient-boosted and
        extremely randomized trees, cross-fitted on the validation rows) and the blend
        weighs them with IIM, the global model and the mean by their held-out errors (see
        :mod:`fediim.impute.tree_models`). The engine's imputation is then a validated
        stack, IIM plus trees where they predict the pattern's own rows better;
        ``trees=False`` keeps it to IIM, the global model and the mean.

    Attributes
    ----------
    n_features_in_ : int
        Number of columns seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names seen in ``fit`` (only for DataFrame input).
    mean_, scale_ : ndarray of shape (n_features,)
        The scaling applied before neighbour search and learning (over the encoded columns
        when some column is coded).
    statistics_ : ndarray of shape (n_features,)
        Column means, the last resort for a cell no training row can impute (encoded
        columns likewise).
    encoding_ : MixedEncoding or None
        The columns' encoding, None when every column is numeric.

    See Also
    --------
    knn_imputer : kNN imputation from the same engine (ell = 1, uniform weights).
    glr_imputer : global ridge regression from the same engine (ell = n).
    fediim.FederatedIIM : private federated IIM over several sites' tables.

    Examples
    --------
    >>> import numpy as np
    >>> from fediim import IIMImputer
    >>> X = np.array([[1.0, 2.0], [2.0, 4.1], [3.0, np.nan], [4.0, 8.0], [5.0, 9.9]])
    >>> imputer = IIMImputer(n_neighbors=2).fit(X)
    >>> imputer.transform(X)[2].round(2)
    array([3.  , 6.01])
    >>> result = imputer.impute(X)
    >>> result.method[2, 1], int(result.n_candidates[2, 1])
    ('iim', 2)

    Multiple imputation: M completed tables, pooled with Rubin's rules afterwards
    (:func:`fediim.mi.pool`); observed cells are the same in every table.

    >>> tables = IIMImputer(n_neighbors=2, n_imputations=3, random_state=0).fit(
    ...     X).multiple_imputations(X)
    >>> len(tables), [bool(np.isnan(table).any()) for table in tables]
    (3, [False, False, False])
    >>> bool(np.all([table[3, 1] == 8.0 for table in tables]))
    True
    """

    def __init__(
        self,
        *,
        n_neighbors: int = 10,
        ell: int | Literal["adaptive", "n"] = "adaptive",
        ell_grid: tuple[int, ...] | None = None,
        alpha: float | tuple[float, ...] = 1e-3,
        weights: Literal["vote", "uniform"] = "vote",
        include_global: bool = True,
        scale: bool = True,
        validation: Literal["loo", "paper"] = "loo",
        column_kinds: dict[Any, Any] | None = None,
        n_imputations: int = 1,
        random_state: int | np.random.Generator | None = None,
        neighbor_index: Literal["auto", "kdtree", "blas", "hnsw"] = "auto",
        blend: bool = True,
        quadratic: bool = True,
        trees: bool = False,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.ell = ell
        self.ell_grid = ell_grid
        self.alpha = alpha
        self.weights = weights
        self.include_global = include_global
        self.scale = scale
        self.validation = validation
        self.column_kinds = column_kinds
        self.n_imputations = n_imputations
        self.random_state = random_state
        self.neighbor_index = neighbor_index
        self.blend = blend
        self.quadratic = quadratic
        self.trees = trees

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        return tags

    # -- fitting ------------------------------------------------------------------------
    def _config(self) -> IIMConfig:
        if not isinstance(self.n_neighbors, int | np.integer) or self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive int, got {self.n_neighbors!r}")
        if self.validation not in ("loo", "paper"):
            raise ValueError(f"validation must be 'loo' or 'paper', got {self.validation!r}")
        if self.neighbor_index not in INDEX_METHODS:
            raise ValueError(f"neighbor_index must be one of {INDEX_METHODS}, got "
                             f"{self.neighbor_index!r}")
        if self.weights not in ("vote", "uniform"):
            raise ValueError(f"weights must be 'vote' or 'uniform', got {self.weights!r}")
        _check_multiple(self.n_imputations, self.random_state)
        if not isinstance(self.trees, bool | np.bool_):
            raise ValueError(f"trees must be a bool, got {self.trees!r}")
        ell = self.ell
        is_int = isinstance(ell, int | np.integer) and not isinstance(ell, bool)
        if not (ell in ("adaptive", "n") or (is_int and ell >= 1)):
            raise ValueError(f"ell must be 'adaptive', 'n' or an int >= 1, got {ell!r}")
        grid = None if self.ell_grid is None else tuple(int(ell) for ell in self.ell_grid)
        if grid is not None and (not grid or min(grid) < 1):
            raise ValueError(f"ell_grid must be a non-empty sequence of ints >= 1, got "
                             f"{self.ell_grid!r}")
        alpha = self.alpha if np.isscalar(self.alpha) else tuple(self.alpha)
        cfg = IIMConfig(
            n_neighbors=int(self.n_neighbors), ell=ell, ell_grid=grid, alpha=alpha,
            weights=self.weights, include_global=bool(self.include_global),
            validation=self.validation, neighbor_index=self.neighbor_index,
            blend=bool(self.blend), quadratic=bool(self.quadratic), trees=bool(self.trees),
        )
        cfg.alphas()  # validates alpha
        return cfg

    def fit(self, X: Any, y: Any = None) -> IIMImputer:
        """Store the (scaled) training rows; individual models are learned on demand."""
        self._config_ = self._config()
        self.encoding_ = fit_encoding(X, self.column_kinds)
        X = validate_data(self, self._codes(X), dtype=np.float64, ensure_all_finite="allow-nan")
        X = self._encoded(X)
        observed = ~np.isnan(X)
        empty = np.flatnonzero(~observed.any(axis=0))
        if empty.size:
            names = self._column_names(empty)
            raise ValueError(f"columns with no observed value cannot be imputed: {names}")
        self.statistics_ = np.nanmean(X, axis=0)
        if self.scale:
            self.mean_ = self.statistics_.copy()
            sd = np.nanstd(X, axis=0)
            self.scale_ = np.where(sd > 0, sd, 1.0)
            if self.encoding_ is not None:  # indicators: a fixed scale (see encoding)
                fixed = self.encoding_.fixed_scale()
                self.scale_ = np.where(np.isnan(fixed), self.scale_, fixed)
        else:
            self.mean_ = np.zeros(X.shape[1])
            self.scale_ = np.ones(X.shape[1])
        self._fit_X = (X - self.mean_) / self.scale_
        self._fit_observed = observed
        self._patterns: OrderedDict[tuple[int, tuple[int, ...]], PatternModels | None] = (
            OrderedDict())
        return self

    def _codes(self, X: Any) -> Any:
        """``X`` with every coded column's labels as level codes (unchanged if none)."""
        if self.encoding_ is None:
            return X
        return table_codes(X, self.encoding_)

    def _encoded(self, X: np.ndarray) -> np.ndarray:
        """The engine matrix of a validated ``X`` (codes expanded; see encoding)."""
        return X if self.encoding_ is None else self.encoding_.encode(X)

    def _column_names(self, cols: np.ndarray) -> list[str]:
        names = getattr(self, "feature_names_in_", None)
        return [str(names[column]) if names is not None else f"x{column}" for column in cols]

    def pattern(self, target: int, features: tuple[int, ...]) -> PatternModels | None:
        """The models of (target, features), made on first use and kept (None: no
        training row observes them all)."""
        key = (target, features)
        if key in self._patterns:
            self._patterns.move_to_end(key)
            return self._patterns[key]
        cols = list(features) + [target]
        rows = np.flatnonzero(self._fit_observed[:, cols].all(axis=1))
        models = None if rows.size == 0 else PatternModels(
            self._fit_X[np.ix_(rows, list(features))], self._fit_X[rows, target],
            self._config_,
        )
        self._patterns[key] = models
        # Bounded memory: the least recently used patterns go beyond PATTERN_CACHE_ROWS
        # training rows in all (the newest always stays).
        cached = sum(entry.n_rows for entry in self._patterns.values() if entry is not None)
        while cached > PATTERN_CACHE_ROWS and len(self._patterns) > 1:
            oldest = self._patterns.popitem(last=False)[1]
            cached -= 0 if oldest is None else oldest.n_rows
        return models

    # -- imputation ---------------------------------------------------------------------
    def impute(self, X: Any) -> ImputationResult:
        """Impute ``X`` and return the values with per-cell provenance and uncertainty."""
        check_is_fitted(self, "_fit_X")
        X = validate_data(self, self._codes(X), dtype=np.float64, ensure_all_finite="allow-nan",
                          reset=False)
        if self.encoding_ is None:
            return self._impute_encoded(X)
        return self.encoding_.decode(self._impute_encoded(self.encoding_.encode(X)), X)

    def _impute_encoded(self, X: np.ndarray) -> ImputationResult:
        """:meth:`impute` on the engine's (encoded, unscaled) matrix."""
        result = empty_result(X)
        for pattern_rows, features, targets in missing_patterns(result.imputed):
            # Bounded memory: a pattern's rows IMPUTE_CHUNK_ROWS at a time.
            for start in range(0, len(pattern_rows), IMPUTE_CHUNK_ROWS):
                rows = pattern_rows[start : start + IMPUTE_CHUNK_ROWS]
                queries = ((X[rows] - self.mean_) / self.scale_)[:, list(features)]
                for target in targets:
                    self._impute_target(result, rows, queries, target, features)
        return result

    def _impute_target(self, result: ImputationResult, rows: np.ndarray, queries: np.ndarray,
                       target: int, features: tuple[int, ...]) -> None:
        """Fill ``target`` in ``rows`` (observed on ``features``; ``queries`` standardized),
        from the pattern's models, or with the column mean when no training row has both."""
        model = self.pattern(target, features) if features else None
        if model is None:
            result.values[rows, target] = self.statistics_[target]
            result.uncertainty[rows, target] = 0.0
            result.method[rows, target] = METHOD_MEAN
            return
        found = model.impute(queries)
        result.values[rows, target] = found.values * self.scale_[target] + self.mean_[target]
        result.uncertainty[rows, target] = found.spread * self.scale_[target]
        result.method[rows, target] = METHOD_IIM
        result.ell[rows, target] = found.ell.mean(axis=1)
        result.n_candidates[rows, target] = found.neighbors.shape[1]

    def impute_multiple(self, X: Any) -> list[ImputationResult]:
        """``n_imputations`` draws of the completed ``X`` from the predictive distribution
        (see :mod:`fediim.impute.multiple`), each with the single imputation's provenance
        and uncertainty columns."""
        single = self.impute(X)
        X = validate_data(self, self._codes(X), dtype=np.float64, ensure_all_finite="allow-nan",
                          reset=False)
        groups = list(missing_patterns(np.isnan(self._encoded(X))))
        return draw_imputations(self, X, single, groups, int(self.n_imputations),
                                np.random.default_rng(self.random_state))

    def multiple_imputations(self, X: Any) -> list[Any]:
        """``n_imputations`` completed copies of ``X`` (DataFrames for a DataFrame; coded
        columns as their labels), to analyse one by one and pool with
        :func:`fediim.mi.pool`."""
        return [_like_input(X, self._labels(result.values))
                for result in self.impute_multiple(X)]

    def transform(self, X: Any) -> Any:
        """Impute missing values of ``X`` (DataFrame in, DataFrame out; coded columns as
        their labels)."""
        return _like_input(X, self._labels(self.impute(X).values))

    def _labels(self, values: np.ndarray) -> np.ndarray:
        """Imputed ``values`` with every coded column's codes as its labels."""
        return values if self.encoding_ is None else self.encoding_.labels(values)

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> Any:
        """Fit on ``X`` and impute it."""
        return self.fit(X).transform(X)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Output columns are the input columns, in order."""
        check_is_fitted(self, "n_features_in_")
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            names = np.array([f"x{column}" for column in range(self.n_features_in_)],
                             dtype=object)
        return np.asarray(names, dtype=object)


def _check_multiple(n_imputations: Any, random_state: Any) -> None:
    """``n_imputations`` is an int >= 1; ``random_state`` an int >= 0, a Generator or
    None."""
    if (not isinstance(n_imputations, int | np.integer) or isinstance(n_imputations, bool)
            or n_imputations < 1):
        raise ValueError(f"n_imputations must be an int >= 1, got {n_imputations!r}")
    seed_ok = (isinstance(random_state, int | np.integer) and not isinstance(random_state, bool)
               and random_state >= 0)
    if not (random_state is None or seed_ok
            or isinstance(random_state, np.random.Generator)):
        raise ValueError(f"random_state must be an int >= 0, a numpy Generator or None, got "
                         f"{random_state!r}")


def empty_result(x: np.ndarray) -> ImputationResult:
    """The result for ``x`` before anything is imputed: observed values copied, every
    missing cell marked, no provenance yet."""
    n_rows, n_columns = x.shape
    return ImputationResult(
        values=x.copy(), imputed=np.isnan(x), uncertainty=np.full((n_rows, n_columns), np.nan),
        method=np.full((n_rows, n_columns), "", dtype=object),
        ell=np.full((n_rows, n_columns), np.nan),
        n_candidates=np.zeros((n_rows, n_columns), dtype=np.int64))


def missing_patterns(missing: np.ndarray
                     ) -> Iterator[tuple[np.ndarray, tuple[int, ...], list[int]]]:
    """The incomplete rows grouped by missingness pattern, each group as (its rows, the
    columns they observe, the columns they miss); complete rows belong to no group."""
    incomplete = np.flatnonzero(missing.any(axis=1))
    if incomplete.size == 0:
        return
    patterns, inverse = np.unique(missing[incomplete], axis=0, return_inverse=True)
    for number, pattern in enumerate(patterns):
        yield (incomplete[inverse.ravel() == number],
               tuple(int(column) for column in np.flatnonzero(~pattern)),
               [int(column) for column in np.flatnonzero(pattern)])


def _like_input(X: Any, values: np.ndarray) -> Any:
    """Wrap ``values`` in a DataFrame shaped like ``X`` when ``X`` is one."""
    if hasattr(X, "iloc") and hasattr(X, "columns"):
        import pandas as pd

        return pd.DataFrame(values, columns=X.columns, index=X.index)
    return values


def knn_imputer(n_neighbors: int = 10, scale: bool = True) -> IIMImputer:
    """kNN imputation from the IIM engine (ell = 1, uniform weights; Proposition 1)."""
    return IIMImputer(n_neighbors=n_neighbors, ell=1, weights="uniform", scale=scale)


def glr_imputer(alpha: float = 1e-3, scale: bool = True) -> IIMImputer:
    """Global ridge regression from the IIM engine (ell = n; Proposition 2)."""
    return IIMImputer(ell="n", alpha=alpha, scale=scale)
