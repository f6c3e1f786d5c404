"""The imputation methods a study compares, and the computation of one task.

fediim
    local           ``IIMImputer`` on each site alone (nothing shared, no privacy cost)
    centralized     ``IIMImputer`` on every site's rows pooled: the non-private ceiling
    federated       the private model bank's candidates only
    hybrid          the bank blended with the site's own exact IIM (``site_impute`` hybrid)
    federated_mean  the federation-wide column means read off the bank
The three private ones impute from one ``FederatedIIM`` fit per (dataset, seed, epsilon):
they are post-processing of the same bank, so each site spends its budget once for all.

Baselines (as in ``benchmarks/paper_protocol.py``); ``<name>`` pools all sites (not
private), ``<name>_local`` runs on each site alone
    knn             scikit-learn ``KNNImputer(n_neighbors=k)`` on z-scored data
    mean            column means
    mice            ``IterativeImputer(max_iter=10, random_state=seed)``
    missforest      ``IterativeImputer`` over ``ExtraTreesRegressor(n_estimators=100)``,
                    mean initialisation, ``max_iter=10`` (MissForest-style)

Scoring (as in ``benchmarks/privacy_utility.py``): NRMSE over the hidden cells, each error
divided by its attribute's std (ddof=0) over the federation's complete rows (``nanstd``
over all rows if there are fewer than two), pooled over all sites and per site.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fediim import IIMImputer
from fediim.federated import FederatedIIM, site_impute
from simulations.config import PRIVATE_METHODS, Study, eps_key
from simulations.data import Federation, cached_raw, make_federation
from simulations.missingness import apply_missingness

__all__ = ["Task", "TaskResult", "compute_task", "prepare", "score"]

_SITE_MODE = {"federated": "federated", "hybrid": "hybrid", "federated_mean": "mean"}


@dataclass(frozen=True)
class Task:
    """One unit of work: dataset x seed x (epsilon) x the methods computed together.

    Private methods of one (dataset, seed, epsilon) share a task (one bank fit); every other
    method is a task of its own. ``keys`` are the cache keys of the task's cells, in the
    order of ``methods``.
    """

    study: Study
    dataset_index: int
    seed: int
    epsilon: float | None
    methods: tuple[str, ...]
    keys: tuple[str, ...]

    @property
    def dataset(self) -> str:
        return self.study.config.datasets[self.dataset_index].name

    def label(self) -> str:
        eps = "" if self.epsilon is None else f" ε={eps_key(self.epsilon)}"
        return f"{self.dataset} seed={self.seed}{eps} {'+'.join(self.methods)}"


#: What a task returns: one record per method (same order as ``Task.methods``).
TaskResult = list[dict[str, Any]]


@dataclass(frozen=True)
class Prepared:
    fed: Federation
    masked: list[np.ndarray]
    masks: list[np.ndarray]
    sd: np.ndarray


def prepare(study: Study, index: int, seed: int) -> Prepared:
    """Load, partition and mask dataset ``index`` for ``seed`` (deterministic)."""
    fed = make_federation(study, index, seed, raw=cached_raw(study, index))
    masks = apply_missingness(fed.sites, fed.columns, study.config.missingness, seed)
    masked = []
    for x, mk in zip(fed.sites, masks, strict=True):
        xm = x.copy()
        xm[mk] = np.nan
        masked.append(xm)
    allx = np.vstack(fed.sites)
    complete = allx[~np.isnan(allx).any(axis=1)]
    sd = complete.std(axis=0) if len(complete) >= 2 else np.nanstd(allx, axis=0)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    return Prepared(fed, masked, masks, sd)


def score(out: Sequence[np.ndarray], p: Prepared) -> dict[str, Any]:
    """Pooled and per-site NRMSE; checks every hidden cell got a finite value."""
    errs, per_site, n_site = [], {}, {}
    for y, x, xm, mk, sid in zip(out, p.fed.sites, p.masked, p.masks, p.fed.site_names,
                                 strict=True):
        obs = ~np.isnan(xm)
        if not np.array_equal(y[obs], xm[obs]):
            raise RuntimeError(f"site {sid}: observed cells were changed")
        r, c = np.nonzero(mk)
        if not np.all(np.isfinite(y[r, c])):
            raise RuntimeError(f"site {sid}: {int((~np.isfinite(y[r, c])).sum())} hidden "
                               "cell(s) were not imputed")
        e = (y[r, c] - x[r, c]) / p.sd[c]
        errs.append(e)
        per_site[sid] = float(np.sqrt(np.mean(e**2))) if e.size else None
        n_site[sid] = int(e.size)
    allerr = np.concatenate(errs)
    if allerr.size == 0:
        raise RuntimeError("no cells were hidden (missingness.rate too small for the data?)")
    return {"nrmse": float(np.sqrt(np.mean(allerr**2))), "nrmse_site": per_site,
            "n_masked": int(allerr.size), "n_masked_site": n_site}


# -- baselines ----------------------------------------------------------------------------
def _knn(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.impute import KNNImputer

    mu = np.nanmean(x, axis=0)
    sd = np.nanstd(x, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return KNNImputer(n_neighbors=k).fit_transform((x - mu) / sd) * sd + mu


def _mean(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    return np.where(np.isnan(x), np.nanmean(x, axis=0), x)


def _iterative(x: np.ndarray, imp: Any) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.asarray(imp.fit_transform(x), dtype=np.float64)


def _mice(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    return _iterative(x, IterativeImputer(max_iter=10, random_state=seed))


def _missforest(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.ensemble import ExtraTreesRegressor
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    est = ExtraTreesRegressor(n_estimators=100, random_state=seed, n_jobs=1)
    return _iterative(x, IterativeImputer(estimator=est, max_iter=10, random_state=seed,
                                          initial_strategy="mean"))


def _iim(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    return np.asarray(IIMImputer(n_neighbors=k).fit_transform(x), dtype=np.float64)


_TABLE_METHODS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "iim": _iim, "knn": _knn, "mean": _mean, "mice": _mice, "missforest": _missforest,
}


def _on_seen(fn: Callable[[np.ndarray, int, int], np.ndarray], x: np.ndarray, k: int,
             seed: int) -> np.ndarray:
    """``fn`` over the columns ``x`` observes at all; a never-observed column stays NaN
    (switzerland's chol in UCI Heart: no truth, never hidden, not scored)."""
    seen = np.flatnonzero(~np.isnan(x).all(axis=0))
    out = x.copy()
    if x.shape[0] and np.isnan(x[:, seen]).any():
        out[:, seen] = fn(x[:, seen], k, seed)
    obs = ~np.isnan(x)
    out[obs] = x[obs]  # observed cells are kept exactly
    return out


def _run_public(method: str, p: Prepared, k: int, seed: int) -> list[np.ndarray]:
    if method in ("local", "centralized"):
        base, local = "iim", method == "local"
    elif method.endswith("_local"):
        base, local = method.removesuffix("_local"), True
    else:
        base, local = method, False
    fn = _TABLE_METHODS[base]
    if local:
        return [_on_seen(fn, x, k, seed) for x in p.masked]
    pooled = _on_seen(fn, np.vstack(p.masked), k, seed)
    return np.split(pooled, np.cumsum([len(x) for x in p.masked])[:-1])


# -- one task -----------------------------------------------------------------------------
def compute_task(task: Task) -> TaskResult:
    """Run one task and return its records (one per method, in order)."""
    study, s = task.study, task.study.config.study
    p = prepare(study, task.dataset_index, task.seed)
    base = {"dataset": task.dataset, "seed": task.seed, "sites": p.fed.site_names,
            "n_rows_site": {n: int(len(x)) for n, x in zip(p.fed.site_names, p.fed.sites,
                                                            strict=True)}}
    recs: TaskResult = []
    if task.epsilon is None:
        for method, key in zip(task.methods, task.keys, strict=True):
            assert method not in PRIVATE_METHODS
            t0 = time.perf_counter()
            out = _run_public(method, p, s.k, task.seed)
            secs = time.perf_counter() - t0
            recs.append({**base, "method": method, "epsilon": None, "private": False,
                         **score(out, p), "time_s": secs, "privacy_site": None, "key": key})
        return recs

    if p.fed.bounds is None:  # validated up front; defensive for direct calls
        raise ValueError(f"dataset {task.dataset!r}: private methods need public bounds for "
                         "every column")
    t0 = time.perf_counter()
    f = FederatedIIM(k=s.k, epsilon=task.epsilon, delta=s.delta, bounds=p.fed.bounds,
                     mode="federated", seed=task.seed).fit(p.masked, site_ids=p.fed.site_names)
    fit_s = time.perf_counter() - t0
    privacy = {}
    for sid, led in zip(p.fed.site_names, f.ledgers_, strict=True):
        privacy[sid] = None if led is None else {
            "rho_spent": float(led.spent_rho), "epsilon_spent": float(led.epsilon(s.delta)),
            "rho_budget": float(led.rho_budget)}
    bank_cells = {sid: int(np.sum(f.bank_.site == sid)) for sid in p.fed.site_names}
    for method, key in zip(task.methods, task.keys, strict=True):
        t1 = time.perf_counter()
        out = [site_impute(x, f.bank_, f.bounds_, mode=_SITE_MODE[method], n_neighbors=s.k,
                           site_id=sid).values
               for x, sid in zip(p.masked, p.fed.site_names, strict=True)]
        imp_s = time.perf_counter() - t1
        recs.append({**base, "method": method, "epsilon": eps_key(task.epsilon),
                     "private": True, **score(out, p), "time_s": fit_s + imp_s,
                     "fit_s": fit_s, "impute_s": imp_s, "privacy_site": privacy,
                     "bank_cells_site": bank_cells, "key": key})
    return recs
