"""The imputation methods a study compares, and the computation of one task.

fediim
    local           ``IIMImputer`` on each site alone (nothing shared, no privacy cost)
    centralized     ``IIMImputer`` on every site's rows pooled: the non-private ceiling
    federated       the private model bank's candidates only
    hybrid          the bank blended with the site's own exact IIM (``site_impute`` hybrid)
    federated_mean  the federation-wide column means read off the bank
The three private ones impute from one ``FederatedIIM`` fit per (dataset, seed, epsilon):
they are post-processing of the same bank, so each site spends its budget once for all.

Baselines (``simulations.baselines``: knn, mean, mice, missforest); ``<name>`` pools all
sites (not private), ``<name>_local`` runs on each site alone.

Coded columns (``[datasets.levels]``) are imputed as declared levels by every method and
also scored by accuracy (share of hidden cells given their true level; binary and
categorical columns), pooled and per site.

Downstream (``[downstream]``): a regression fitted on each imputed federation, and with
``local``, ``centralized`` and the private methods also on M drawn federations
(multiple imputation, pooled with Rubin's rules); see :mod:`simulations.downstream`.

Scoring: NRMSE over the hidden cells, each error divided by its attribute's std (ddof=0)
over the federation's complete rows (:func:`pooled_std`), pooled over all sites, per site
and per (site, column). Cells of a column a site never measures (``[datasets.absent]``)
are scored apart, per (site, column): a method that works on the site alone cannot
impute them, and they would swamp the site's other hidden cells.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fediim import IIMImputer
from fediim.federated import FederatedIIM, site_impute
from fediim.federated.multiple import site_draws
from fediim.impute.encoding import table_codes
from simulations.baselines import impute_table
from simulations.config import PRIVATE_METHODS, Study, eps_key
from simulations.data import Federation, cached_raw, make_federation
from simulations.downstream import downstream_record
from simulations.missingness import hide_cells

__all__ = ["Prepared", "Task", "TaskResult", "compute_task", "pooled_std", "prepare", "score"]

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
    """One dataset and seed ready to impute: the sites, their masked copies, the hidden
    cells (boolean masks), the never-measured cells and the NRMSE scale."""

    fed: Federation
    masked: list[np.ndarray]
    masks: list[np.ndarray]
    sd: np.ndarray
    #: per site, the cells of columns it never measures (``[datasets.absent]``): missing in
    #: ``masked``, true in ``fed.sites``, scored apart from ``masks``
    never: list[np.ndarray]


def prepare(study: Study, index: int, seed: int) -> Prepared:
    """Load, partition and mask dataset ``index`` for ``seed`` (deterministic)."""
    fed = make_federation(study, index, seed, raw=cached_raw(study, index))
    masks, never = hide_cells(fed.sites, fed.columns, fed.site_names, fed.absent,
                              study.config.missingness, seed)
    masked = []
    for x, mk, nv in zip(fed.sites, masks, never, strict=True):
        xm = x.copy()
        xm[mk | nv] = np.nan
        masked.append(xm)
    return Prepared(fed, masked, masks, pooled_std(fed.sites), never)


def pooled_std(sites: Sequence[np.ndarray]) -> np.ndarray:
    """Each attribute's std (ddof=0) over the federation's complete rows: the NRMSE scale.

    With fewer than two complete rows, ``nanstd`` over all rows; a zero or undefined std
    counts as 1.
    """
    allx = np.vstack(sites)
    complete = allx[~np.isnan(allx).any(axis=1)]
    sd = complete.std(axis=0) if len(complete) >= 2 else np.nanstd(allx, axis=0)
    return np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)


def score(out: Sequence[np.ndarray], p: Prepared) -> dict[str, Any]:
    """NRMSE over the hidden cells, pooled, per site and per (site, column); checks every
    hidden cell got a finite value. Never-measured cells are scored apart
    (:func:`_score_never`): a method may be unable to impute them."""
    errs, per_site, n_site, per_column, n_column = [], {}, {}, {}, {}
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
        per_site[sid] = _rms(e)
        n_site[sid] = int(e.size)
        per_column[sid] = {col: _rms(e[c == j]) for j, col in enumerate(p.fed.columns)}
        n_column[sid] = {col: int(np.sum(c == j)) for j, col in enumerate(p.fed.columns)}
    allerr = np.concatenate(errs)
    if allerr.size == 0:
        raise RuntimeError("no cells were hidden (missingness.rate too small for the data?)")
    return {"nrmse": float(np.sqrt(np.mean(allerr**2))), "nrmse_site": per_site,
            "n_masked": int(allerr.size), "n_masked_site": n_site,
            "nrmse_site_column": per_column, "n_masked_site_column": n_column,
            **_score_never(out, p), **_score_levels(out, p)}


def _score_levels(out: Sequence[np.ndarray], p: Prepared) -> dict[str, Any]:
    """Accuracy on the hidden cells of binary and categorical columns, pooled and per
    site, and whether every imputed coded cell is a declared level (nothing without
    ``[datasets.levels]``)."""
    voted = [j for j, (kind, _) in p.fed.kinds.items() if kind != "ordinal"]
    if not p.fed.kinds:
        return {}
    hits, per_site, n_site = [], {}, {}
    for y, x, mk, xm, sid in zip(out, p.fed.sites, p.masks, p.masked, p.fed.site_names,
                                 strict=True):
        for j, (_, levels) in p.fed.kinds.items():
            filled = np.isnan(xm[:, j]) & np.isfinite(y[:, j])
            if not np.isin(y[filled, j], levels).all():
                raise RuntimeError(f"site {sid}: column {p.fed.columns[j]} got a value that "
                                   "is no declared level")
        r, c = np.nonzero(mk[:, voted])
        columns = np.asarray(voted, dtype=np.intp)[c]
        hit = y[r, columns] == x[r, columns]
        hits.append(hit)
        per_site[sid] = float(hit.mean()) if hit.size else None
        n_site[sid] = int(hit.size)
    pooled = np.concatenate(hits)
    return {"accuracy": float(pooled.mean()) if pooled.size else None,
            "accuracy_site": per_site, "n_coded_masked_site": n_site}


def _rms(e: np.ndarray) -> float | None:
    return float(np.sqrt(np.mean(e**2))) if e.size else None


def _score_never(out: Sequence[np.ndarray], p: Prepared) -> dict[str, Any]:
    """NRMSE on each never-measured (site, column), against the truth.

    ``nrmse_absent[site][column]`` is None when the method left any of those cells empty
    (a site alone cannot impute a column it never measures); ``n_absent_unimputed`` counts
    them.
    """
    nrmse: dict[str, dict[str, float | None]] = {}
    count: dict[str, dict[str, int]] = {}
    empty: dict[str, dict[str, int]] = {}
    for y, x, nv, sid in zip(out, p.fed.sites, p.never, p.fed.site_names, strict=True):
        for col in p.fed.absent.get(sid, ()):
            j = p.fed.columns.index(col)
            rows = np.flatnonzero(nv[:, j])
            e = (y[rows, j] - x[rows, j]) / p.sd[j]
            n_empty = int(np.sum(~np.isfinite(e)))
            nrmse.setdefault(sid, {})[col] = None if n_empty else _rms(e)
            count.setdefault(sid, {})[col] = int(rows.size)
            empty.setdefault(sid, {})[col] = n_empty
    return {"nrmse_absent": nrmse, "n_absent": count, "n_absent_unimputed": empty}


def _run_public(method: str, p: Prepared, k: int, seed: int) -> list[np.ndarray]:
    """A non-private method's imputation of every site: on each site alone (``local``,
    ``<name>_local``) or on all sites' masked rows pooled (``centralized``, ``<name>``)."""
    if method in ("local", "centralized"):
        base, local = "iim", method == "local"
    elif method.endswith("_local"):
        base, local = method.removesuffix("_local"), True
    else:
        base, local = method, False
    kinds = p.fed.kinds or None
    if local:
        return [impute_table(base, x, k=k, seed=seed, kinds=kinds).values for x in p.masked]
    pooled = impute_table(base, np.vstack(p.masked), k=k, seed=seed, kinds=kinds).values
    return np.split(pooled, np.cumsum([len(x) for x in p.masked])[:-1])


def _private_imputation(f: FederatedIIM, p: Prepared, method: str, k: int
                        ) -> list[np.ndarray]:
    """Every site imputed from the fitted bank in ``method``'s mode (coded columns decoded
    into their levels by the estimator)."""
    if p.fed.kinds:
        return f.set_params(mode=_SITE_MODE[method]).transform(p.masked)
    return [site_impute(x, f.bank_, f.bounds_, mode=_SITE_MODE[method], n_neighbors=k,
                        site_id=sid).values
            for x, sid in zip(p.masked, p.fed.site_names, strict=True)]


# -- one task -----------------------------------------------------------------------------
def compute_task(task: Task) -> TaskResult:
    """Run one task and return its records (one per method, in order)."""
    p = prepare(task.study, task.dataset_index, task.seed)
    base = {"dataset": task.dataset, "seed": task.seed, "sites": p.fed.site_names,
            "n_rows_site": {n: int(len(x)) for n, x in zip(p.fed.site_names, p.fed.sites,
                                                            strict=True)}}
    if task.epsilon is None:
        return [_public_record(task, method, p, base) for method in task.methods]
    return _private_records(task, p, base)


def _public_record(task: Task, method: str, p: Prepared, base: dict[str, Any]
                   ) -> dict[str, Any]:
    """One non-private method's cell: NRMSE and the time it took."""
    assert method not in PRIVATE_METHODS
    t0 = time.perf_counter()
    out = _run_public(method, p, task.study.config.study.k, task.seed)
    secs = time.perf_counter() - t0
    record = {**base, "method": method, "epsilon": None, "private": False, **score(out, p),
              "time_s": secs, "privacy_site": None}
    down = task.study.config.downstream
    if down is not None:
        drawn = _public_draws(method, p, task.study.config.study.k, task.seed,
                              down.n_imputations)
        record["downstream"] = downstream_record(down, p.fed.columns, p.fed.sites, out, drawn)
    return record


def _public_draws(method: str, p: Prepared, k: int, seed: int, n_imputations: int
                  ) -> list[list[np.ndarray]] | None:
    """IIM's multiple imputation as ``[imputation][site]`` for ``local`` (each site alone)
    and ``centralized`` (all sites pooled); None for the baselines (they draw none)."""
    if method not in ("local", "centralized"):
        return None

    def draws(x: np.ndarray) -> list[np.ndarray]:
        return IIMImputer(n_neighbors=k, n_imputations=n_imputations, random_state=seed,
                          column_kinds=p.fed.kinds or None).fit(x).multiple_imputations(x)

    if method == "local":
        per_site = [draws(x) for x in p.masked]
        return [list(federation) for federation in zip(*per_site, strict=True)]
    cuts = np.cumsum([len(x) for x in p.masked])[:-1]
    return [np.split(table, cuts) for table in draws(np.vstack(p.masked))]


def _private_records(task: Task, p: Prepared, base: dict[str, Any]) -> TaskResult:
    """The private methods' cells: one bank fit (each site spends its budget once), then
    each method imputes every site from it."""
    s = task.study.config.study
    if p.fed.bounds is None:  # validated up front; defensive for direct calls
        raise ValueError(f"dataset {task.dataset!r}: private methods need public bounds for "
                         "every column")
    t0 = time.perf_counter()
    clip_columns = [column not in p.fed.code_columns for column in p.fed.columns]
    f = FederatedIIM(n_neighbors=s.k, epsilon=task.epsilon, delta=s.delta, bounds=p.fed.bounds,
                     mode="federated", seed=task.seed, clip_columns=clip_columns,
                     aggregation=s.aggregation,
                     column_kinds=p.fed.kinds or None).fit(p.masked, site_ids=p.fed.site_names)
    fit_s = time.perf_counter() - t0
    privacy = {sid: None if led is None else {
        "rho_spent": float(led.spent_rho), "epsilon_spent": float(led.epsilon(s.delta)),
        "rho_budget": float(led.rho_budget)}
        for sid, led in zip(p.fed.site_names, f.ledgers_, strict=True)}
    bank_cells = {sid: int(np.sum(f.bank_.site == sid)) for sid in p.fed.site_names}
    aggregation = f.bank_.meta.get("aggregation", "per-site")
    recs: TaskResult = []
    for method in task.methods:
        t1 = time.perf_counter()
        out = _private_imputation(f, p, method, s.k)
        imp_s = time.perf_counter() - t1
        recs.append({**base, "method": method, "epsilon": eps_key(task.epsilon),
                     "private": True, **score(out, p), "time_s": fit_s + imp_s,
                     "fit_s": fit_s, "impute_s": imp_s, "privacy_site": privacy,
                     "bank_cells_site": bank_cells, "aggregation": aggregation,
                     "bank_cells": int(f.bank_.n_cells)})
        down = task.study.config.downstream
        if down is not None:
            drawn = _private_draws(f, p, _SITE_MODE[method], s.k, task.seed,
                                   down.n_imputations)
            recs[-1]["downstream"] = downstream_record(down, p.fed.columns, p.fed.sites, out,
                                                       drawn)
    return recs


def _private_draws(f: FederatedIIM, p: Prepared, mode: str, k: int, seed: int,
                   n_imputations: int) -> list[list[np.ndarray]]:
    """Multiple imputation from the bank (:func:`~fediim.federated.multiple.site_draws`),
    as ``[imputation][site]``, each site's draws seeded by the seed and its position
    (coded columns drawn as levels, given back as their labels)."""
    encoding = f.encoding_
    per_site = [[
        result.values if encoding is None else encoding.labels(result.values)
        for result in site_draws(
            x if encoding is None else table_codes(x, encoding), f.bank_, f.bounds_,
            n_imputations, mode=mode, n_neighbors=k,  # type: ignore[arg-type]
            site_id=sid, random_state=0, rng=np.random.default_rng([seed, number]),
            encoding=encoding)]
        for number, (x, sid) in enumerate(zip(p.masked, p.fed.site_names, strict=True))]
    return [list(federation) for federation in zip(*per_site, strict=True)]
