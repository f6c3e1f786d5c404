"""Table imputers fediim is compared with: one implementation for studies and benchmarks.

    iim         fediim's ``IIMImputer(n_neighbors=k)`` (its other settings the defaults)
    knn         scikit-learn ``KNNImputer(n_neighbors=k)`` on the table z-scored with its
                own nanmean / nanstd, un-scaled afterwards
    mean        column means
    mice        ``IterativeImputer(max_iter=10, random_state=seed)``
    missforest  ``IterativeImputer`` over ``ExtraTreesRegressor(n_estimators=100,
                random_state=seed)``, mean initialisation, ``max_iter=10`` (MissForest-style)

:func:`impute_table` runs one of them on the columns a table observes at all (a column
never observed, like Switzerland's ``chol`` in UCI Heart, stays NaN: there is nothing to
learn it from) and keeps every observed cell exactly. With ``kinds`` (coded columns and
their declared levels) ``iim`` imputes them natively as levels; every other method's value
is rounded to the nearest level, except ``mean``, which imputes the column's mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fediim import IIMImputer

__all__ = ["TABLE_METHODS", "Imputed", "impute_table"]


@dataclass(frozen=True)
class Imputed:
    """An imputed table and what the method reported about the run (iterative imputers:
    ``n_iter`` and the distinct convergence warnings)."""

    values: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)


_Method = Callable[[np.ndarray, int, int, int], Imputed]
Kinds = dict[int, tuple[str, tuple[float, ...]]]


def _iim(x: np.ndarray, k: int, seed: int, n_jobs: int, kinds: Kinds | None = None,
         options: Mapping[str, Any] | None = None) -> Imputed:
    imputer = IIMImputer(n_neighbors=k, column_kinds=kinds or None, **(options or {}))
    return Imputed(np.asarray(imputer.fit_transform(x), dtype=np.float64))


def _knn(x: np.ndarray, k: int, seed: int, n_jobs: int) -> Imputed:
    from sklearn.impute import KNNImputer

    mu = np.nanmean(x, axis=0)
    sd = np.nanstd(x, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return Imputed(KNNImputer(n_neighbors=k).fit_transform((x - mu) / sd) * sd + mu)


def _mean(x: np.ndarray, k: int, seed: int, n_jobs: int) -> Imputed:
    return Imputed(np.where(np.isnan(x), np.nanmean(x, axis=0), x))


def _iterative(x: np.ndarray, imputer: Any) -> Imputed:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        values = np.asarray(imputer.fit_transform(x), dtype=np.float64)
    messages = sorted({str(w.message) for w in caught
                       if issubclass(w.category, ConvergenceWarning)})
    return Imputed(values, {"n_iter": int(imputer.n_iter_), "warnings": messages})


def _mice(x: np.ndarray, k: int, seed: int, n_jobs: int) -> Imputed:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    return _iterative(x, IterativeImputer(max_iter=10, random_state=seed))


def _missforest(x: np.ndarray, k: int, seed: int, n_jobs: int) -> Imputed:
    from sklearn.ensemble import ExtraTreesRegressor
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    trees = ExtraTreesRegressor(n_estimators=100, random_state=seed, n_jobs=n_jobs)
    return _iterative(x, IterativeImputer(estimator=trees, max_iter=10, random_state=seed,
                                          initial_strategy="mean"))


def _as_levels(out: np.ndarray, x: np.ndarray, kinds: Kinds, *, mode: bool) -> np.ndarray:
    """Imputed cells of coded columns as declared levels: the nearest one, or with
    ``mode`` the column's most frequent observed level."""
    out = out.copy()
    for j, (_, levels) in kinds.items():
        cells = np.isnan(x[:, j]) & np.isfinite(out[:, j])
        table = np.asarray(levels, dtype=np.float64)
        if mode:
            counts = [(x[:, j] == level).sum() for level in table]
            out[cells, j] = table[int(np.argmax(counts))]
        else:
            out[cells, j] = table[np.abs(out[cells, j, None] - table).argmin(axis=1)]
    return out


#: name -> imputer of one table, see the module docstring.
TABLE_METHODS: dict[str, _Method] = {
    "iim": _iim, "knn": _knn, "mean": _mean, "mice": _mice, "missforest": _missforest,
}


def impute_table(method: str, x: np.ndarray, *, k: int = 10, seed: int = 0, n_jobs: int = 1,
                 kinds: Kinds | None = None, iim_options: Mapping[str, Any] | None = None
                 ) -> Imputed:
    """``x`` with its gaps filled by ``method`` (a key of :data:`TABLE_METHODS`).

    ``k``: neighbours (iim, knn); ``seed``: the iterative imputers' random state;
    ``n_jobs``: MissForest's tree threads (the result depends on it only through the
    order of float sums); ``iim_options``: further IIMImputer parameters of ``iim``
    (e.g. ``blend=False, quadratic=False``: the engine without its default choices).
    """
    run = TABLE_METHODS[method]
    seen = np.flatnonzero(~np.isnan(x).all(axis=0))
    out = x.copy()
    diagnostics: dict[str, Any] = {}
    if x.shape[0] and np.isnan(x[:, seen]).any():
        if method == "iim" and (kinds or iim_options):  # kinds: within the observed columns
            position = {int(j): number for number, j in enumerate(seen)}
            imputed = _iim(x[:, seen], k, seed, n_jobs,
                           {position[j]: spec for j, spec in (kinds or {}).items()
                            if j in position}, iim_options)
        else:
            imputed = run(x[:, seen], k, seed, n_jobs)
        out[:, seen] = imputed.values
        diagnostics = imputed.diagnostics
        if kinds and method != "iim":
            out = _as_levels(out, x, kinds, mode=method == "mean")
    observed = ~np.isnan(x)
    out[observed] = x[observed]
    return Imputed(out, diagnostics)
