"""A study's numbers over seeds: per-cell statistics and paired comparisons with a baseline.

Both read the per-seed records of :func:`simulations.methods.compute_task` (one per
dataset x seed x method x epsilon) and key their results dataset -> method -> epsilon key
(``"0.5"``, ``"inf"``; ``"-"`` for a method without a budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from simulations.config import METHODS, PRIVATE_METHODS

__all__ = ["NP", "eps_sort_key", "paired_against", "paired_differences", "site_gains",
           "summarise"]

NP = "-"  # epsilon key of non-private cells


def _mean_sd(vals: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in vals if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def eps_sort_key(k: str) -> float:
    """Sort key of an epsilon key: non-private first, then by budget, ``inf`` last."""
    return -1.0 if k == NP else (math.inf if k == "inf" else float(k))


def _privacy_mean(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per site: the mean over seeds of the epsilon and rho spent and the rho budget."""
    priv: dict[str, Any] = {}
    for s in rs[0]["sites"]:
        ps = [r["privacy_site"][s] for r in rs if r["privacy_site"].get(s)]
        if ps:
            priv[s] = {k: float(np.mean([p[k] for p in ps]))
                       for k in ("epsilon_spent", "rho_spent", "rho_budget")}
    return priv


def _cell(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statistics over seeds of one (dataset, method, epsilon) cell."""
    vals = [r["nrmse"] for r in rs]
    mean, sd = _mean_sd(vals)
    cell: dict[str, Any] = {
        "n_seeds": len(rs), "seeds": [r["seed"] for r in rs], "nrmse_seeds": vals,
        "nrmse_mean": mean, "nrmse_sd": sd, "nrmse_min": min(vals), "nrmse_max": max(vals),
        "n_masked_mean": float(np.mean([r["n_masked"] for r in rs])),
        "time_s_mean": float(np.mean([r["time_s"] for r in rs])), "nrmse_site": {},
    }
    for s in rs[0]["sites"]:
        m, d = _mean_sd([r["nrmse_site"].get(s) for r in rs])
        cell["nrmse_site"][s] = {"mean": m, "sd": d}
    if rs[0].get("privacy_site") is not None:
        cell["privacy_site"] = _privacy_mean(rs) or None
        cell["bank_cells_site"] = {s: float(np.mean([r["bank_cells_site"][s] for r in rs]))
                                   for s in rs[0]["sites"]}
    return cell


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """dataset -> method -> epsilon key -> statistics over seeds (mean, sample sd, min, max,
    per site, privacy spent); methods in :data:`~simulations.config.METHODS` order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"], r["epsilon"] or NP), []).append(r)
    out: dict[str, Any] = {}
    for (ds, meth, ek), rs in groups.items():
        out.setdefault(ds, {}).setdefault(meth, {})[ek] = _cell(rs)
    for ds in out:
        out[ds] = {m: dict(sorted(v.items(), key=lambda kv: eps_sort_key(kv[0])))
                   for m, v in sorted(out[ds].items(), key=lambda kv: METHODS.index(kv[0]))}
    return out


def paired_differences(records: Sequence[dict[str, Any]], baseline: str = "local"
                       ) -> dict[str, Any]:
    """dataset -> method -> epsilon key -> NRMSE(method) - NRMSE(baseline), paired by seed.

    A seed hides the same cells for every method, so the per-seed difference removes the
    mask-to-mask spread that dominates the sd of each method alone. For every method with
    a budget, on datasets where the (non-private) ``baseline`` ran: ``mean`` and ``se``
    (sample sd / sqrt(n); inf for one seed) of the differences, ``n_seeds``, and
    ``within_noise`` = mean <= 2 se (the seeds do not show the method worse than the
    baseline).
    """
    return paired_against(records, [baseline])


def paired_against(records: Sequence[dict[str, Any]], baselines: Sequence[str],
                   methods: Sequence[str] | None = None) -> dict[str, Any]:
    """dataset -> method -> epsilon key -> NRMSE(method) - min over ``baselines`` of theirs,
    paired by seed, with the statistics of :func:`paired_differences`.

    A private baseline is taken at the method's own epsilon, any other without one; a seed
    where a baseline did not run is left out. ``methods`` defaults to every method with a
    budget. ``["local", "federated"]`` asks whether ``hybrid`` is at least as good as the
    better of what the site has alone and what the bank gives it.
    """
    nrmse = {(r["dataset"], r["method"], r["seed"], r["epsilon"]): r["nrmse"] for r in records}
    diffs: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in records:
        if r["epsilon"] is None if methods is None else r["method"] not in methods:
            continue
        base = [nrmse.get((r["dataset"], b, r["seed"],
                           r["epsilon"] if b in PRIVATE_METHODS else None)) for b in baselines]
        if any(v is None for v in base):
            continue
        diffs.setdefault(r["dataset"], {}).setdefault(r["method"], {}).setdefault(
            r["epsilon"] or NP, []).append(r["nrmse"] - min(v for v in base if v is not None))
    return {ds: {m: {ek: _paired_stats(d) for ek, d in sorted(
                 by_eps.items(), key=lambda kv: eps_sort_key(kv[0]))}
                 for m, by_eps in sorted(meths.items(), key=lambda kv: METHODS.index(kv[0]))}
            for ds, meths in diffs.items()}


def _paired_stats(d: Sequence[float]) -> dict[str, Any]:
    mean = float(np.mean(d))
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    return {"mean": mean, "se": se, "n_seeds": len(d), "within_noise": bool(mean <= 2 * se)}


def site_gains(records: Sequence[dict[str, Any]], epsilon_key: str,
               method: str = "hybrid") -> dict[str, dict[str, Any]]:
    """dataset -> site -> what joining gains it: ``method`` at ``epsilon_key`` against the
    site alone (``local``), paired by seed: ``local`` and ``joined`` (mean NRMSE over the
    seeds where both ran) and the statistics of the differences (joined - local; negative
    is a gain)."""
    alone = {(r["dataset"], r["seed"]): r["nrmse_site"] for r in records
             if r["method"] == "local"}
    pairs: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in records:
        if r["method"] != method or r["epsilon"] != epsilon_key:
            continue
        local = alone.get((r["dataset"], r["seed"]))
        for site, joined in r["nrmse_site"].items():
            if local is not None and joined is not None and local.get(site) is not None:
                pairs.setdefault(r["dataset"], {}).setdefault(site, []).append(
                    (local[site], joined))
    return {ds: {site: {"local": float(np.mean([a for a, _ in p])),
                        "joined": float(np.mean([b for _, b in p])),
                        **_paired_stats([b - a for a, b in p])}
                 for site, p in by_site.items()}
            for ds, by_site in pairs.items()}
