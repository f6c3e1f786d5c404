"""Does the smallest heart hospital gain from the federation? Paired, per masked cell.

The privacy-utility benchmark scores Switzerland (123 patients, 46 complete once ``chol``
is set aside) on ~2 masked cells per seed, far too few to tell methods apart. This script
runs the same protocol (the federation of ``simulations/studies/heart.toml``, masked by
``mask_one_attribute``: 5% of each site's complete rows lose one attribute) for many seeds
and keeps every masked cell's error, so methods are compared *paired* on the same cells,
with a standard error.

Methods at the smallest site (all impute the same masked tables; one bank per seed and ε):
    local          IIMImputer on the site alone
    hybrid         site_impute(mode="hybrid"): local, one side read off the bank (its
                   models, the same at the site's level, or their shrinkage fusion with the
                   site's rows) and the site mean, chosen on the site's own rows
    hybrid_nofed   ablation: the same blend with the federated weight forced to 0 (local +
                   site mean only) -- what the site gets *without* the federation
    federated      bank candidates only

Sweep design (``--sweep N``): random seeds give ~2 cells each, and the federated share of
the hybrid is small, so this design scores *every* cell of the site's complete rows (46
rows x 10 attributes at Switzerland) with masking as in the protocol: each imputation
masks two cells in different rows (the protocol masks ~2 of its 46 complete rows), and
the same fixed pairing of cells is used for every bank. Banks come from N noise seeds
(the other sites masked by the protocol with that seed). The site itself releases
nothing: ``hybrid`` reads the whole bank, and a release of the site's table would put the
sweep's hidden cells into it (``federated`` is left out of this design). Differences are averaged
over banks per cell, then reported with the standard error over cells and, separately,
per bank so that the bank-to-bank spread is visible.

Usage::

    .venv/bin/python benchmarks/small_site.py                 # 40 seeds, ε = 1, 4, ∞
    .venv/bin/python benchmarks/small_site.py --seeds 10 --eps 4
    .venv/bin/python benchmarks/small_site.py --eps 4 --frac 0.3 \
        --out benchmarks/results/small_site_frac30.json    # 30% masked: 7x the cells
    .venv/bin/python benchmarks/small_site.py --sweep 6 --eps 4 --jobs 2 \
        --out benchmarks/results/small_site_sweep.json     # every cell, 6 banks, ~19 min
    .venv/bin/python benchmarks/small_site.py --sweep 2 --eps inf --jobs 2 \
        --out benchmarks/results/small_site_sweep_inf.json # ~14 min
    .venv/bin/python benchmarks/small_site.py --sweep 6 --eps 4 --jobs 2 --merge-others \
        --out benchmarks/results/small_site_sweep_merged.json  # global-tree bound
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fediim.federated import FederatedIIM, site_impute
from fediim.io.json_results import write_results
from simulations import load_study
from simulations.baselines import impute_table
from simulations.data import make_federation
from simulations.methods import pooled_std
from simulations.missingness import mask_one_attribute
from simulations.provenance import machine_info
from simulations.tables import fmt

METHODS = ("local", "hybrid", "hybrid_nofed", "federated")
HEART = Path(__file__).resolve().parents[1] / "simulations" / "studies" / "heart.toml"


@dataclass(frozen=True)
class Federation:
    """The heart study's hospitals, their public bounds, the NRMSE scale and the study's
    privacy delta and neighbour count."""

    names: list[str]
    sites: list[np.ndarray]
    bounds: np.ndarray
    sd: np.ndarray
    delta: float
    k: int


def load_federation(study_path: Path = HEART) -> Federation:
    """The first dataset of the study (heart: natural partition, the same for every seed)."""
    study = load_study(study_path)
    fed = make_federation(study, 0, seed=0)
    assert fed.bounds is not None, "the study declares public bounds for every column"
    return Federation(fed.site_names, fed.sites, fed.bounds, pooled_std(fed.sites),
                      study.config.study.delta, study.config.study.k)


def mask_sites(sites: list[np.ndarray], seed: int, frac: float = 0.05
               ) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The protocol's masks (``frac`` of each site's complete rows lose one attribute):
    the masked tables and each site's (rows, columns) of hidden cells, rows ascending."""
    masked, cells = [], []
    for x, mask in zip(sites, mask_one_attribute(sites, frac, seed), strict=True):
        xm = x.copy()
        xm[mask] = np.nan
        masked.append(xm)
        cells.append(np.nonzero(mask))
    return masked, cells


def local_iim(xm: np.ndarray, k: int) -> np.ndarray:
    """IIM on the site alone (a column it never observes stays NaN)."""
    return impute_table("iim", xm, k=k).values


def _smallest(sites: list[np.ndarray]) -> int:
    """Index of the site with the fewest rows (Switzerland in heart)."""
    return int(np.argmin([len(x) for x in sites]))


def _impute(xm: np.ndarray, f: FederatedIIM, sid: str, mode: str,
            use_federation_in_blend: bool = True) -> np.ndarray:
    """The small site's table imputed from the fitted federation's bank (ablation: the
    hybrid blend without its federated weight)."""
    return site_impute(xm, f.bank_, f.bounds_, mode=mode, n_neighbors=f.n_neighbors, site_id=sid,
                       use_federation_in_blend=use_federation_in_blend).values


def run_seed(heart: Federation, seed: int, epsilons: list[float], frac: float = 0.05
             ) -> dict[str, Any]:
    masked, cells = mask_sites(heart.sites, seed, frac)
    small = _smallest(heart.sites)
    sid, x, xm = heart.names[small], heart.sites[small], masked[small]
    r, c = cells[small]

    def err(out: np.ndarray) -> list[float]:
        return ((out[r, c] - x[r, c]) / heart.sd[c]).tolist()

    rec: dict[str, Any] = {"seed": seed, "site": sid, "n_rows": len(x),
                           "cells": [[int(i), int(j)] for i, j in zip(r, c, strict=True)],
                           "local": err(local_iim(xm, heart.k)), "eps": {}}
    for eps in epsilons:
        f = FederatedIIM(n_neighbors=heart.k, epsilon=eps, delta=heart.delta, bounds=heart.bounds,
                         mode="federated", seed=seed).fit(masked, site_ids=heart.names)
        row = {}
        for method in ("hybrid", "federated"):
            row[method] = err(_impute(xm, f, sid, method))
        row["hybrid_nofed"] = err(_impute(xm, f, sid, "hybrid", use_federation_in_blend=False))
        rec["eps"]["inf" if math.isinf(eps) else f"{eps:g}"] = row
    return rec


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """NRMSE over all cells per method, and paired mean squared-error differences."""
    out: dict[str, Any] = {}
    local = np.concatenate([np.square(r["local"]) for r in records])
    for key in records[0]["eps"]:
        sq = {m: np.concatenate([np.square(r["eps"][key][m]) for r in records])
              for m in ("hybrid", "hybrid_nofed", "federated")}
        sq["local"] = local
        s: dict[str, Any] = {"n_cells": int(len(local)),
                             "nrmse": {m: float(np.sqrt(v.mean())) for m, v in sq.items()}}
        for a, b in (("hybrid", "local"), ("hybrid", "hybrid_nofed")):
            d = sq[a] - sq[b]
            s[f"mse_{a}_minus_{b}"] = {"mean": float(d.mean()),
                                       "se": float(d.std(ddof=1) / math.sqrt(len(d)))}
        out[key] = s
    return out


def _pm(d: dict[str, Any]) -> str:
    """A paired difference as "mean ± standard error"."""
    return f"{d['mean']:+.3f} ± {d['se']:.3f}"


def markdown(summary: dict[str, Any], site: str, n_seeds: int) -> str:
    lines = [f"Smallest heart hospital ({site}), {n_seeds} seeds, NRMSE over all its masked "
             "cells; paired MSE differences ± standard error",
             "", "| ε | cells | local | hybrid | hybrid without federation | federated | "
             "MSE hybrid − local | MSE hybrid − hybrid w/o fed |",
             "|---|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        n = s["nrmse"]
        lines.append(f"| {'∞' if key == 'inf' else key} | {s['n_cells']} | {fmt(n['local'])} | "
                     f"{fmt(n['hybrid'])} | {fmt(n['hybrid_nofed'])} | {fmt(n['federated'])} | "
                     f"{_pm(s['mse_hybrid_minus_local'])} | "
                     f"{_pm(s['mse_hybrid_minus_hybrid_nofed'])} |")
    return "\n".join(lines)


def sweep_batches(x: np.ndarray, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Every (complete row, observed column) cell of ``x``, shuffled once and paired into
    imputations of two cells in different rows (a last odd cell goes alone)."""
    seen = np.flatnonzero(~np.isnan(x).all(axis=0))
    complete = np.flatnonzero(~np.isnan(x[:, seen]).any(axis=1))
    cells = [(int(i), int(j)) for i in complete for j in seen]
    pending = [cells[k] for k in np.random.default_rng(seed).permutation(len(cells))]
    batches = []
    while pending:
        a = pending.pop(0)
        k = next((t for t, c in enumerate(pending) if c[0] != a[0]), None)
        batches.append([a] if k is None else [a, pending.pop(k)])
    return batches


def _masked(x: np.ndarray, batch: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    xm = x.copy()
    r = np.array([i for i, _ in batch])
    c = np.array([j for _, j in batch])
    xm[r, c] = np.nan
    return xm, r, c


def sweep_local(heart: Federation) -> dict[str, Any]:
    """Local IIM's error on every sweep cell (it does not depend on the bank)."""
    small = _smallest(heart.sites)
    x = heart.sites[small]
    cells, errs = [], []
    for batch in sweep_batches(x):
        xm, r, c = _masked(x, batch)
        errs += ((local_iim(xm, heart.k)[r, c] - x[r, c]) / heart.sd[c]).tolist()
        cells += batch
    return {"site": heart.names[small], "cells": cells, "local": errs}


def bank_sites(tables: list[np.ndarray], names: list[str], small: int, merge_others: bool
               ) -> tuple[list[np.ndarray], list[str]]:
    """The tables that release into the bank, and their site ids: every site but the small
    one (its release would hold the sweep's hidden cells), or their union as one site named
    "others"."""
    others = [number for number in range(len(tables)) if number != small]
    if not merge_others:
        return [tables[number] for number in others], [names[number] for number in others]
    return [np.vstack([tables[number] for number in others])], ["others"]


def sweep_bank(heart: Federation, seed: int, eps: float, merge_others: bool = False
               ) -> dict[str, Any]:
    """Hybrid and its no-federation ablation on every sweep cell, one bank (noise seed).

    ``merge_others``: the other sites release as *one* site (one tree over their union,
    noise sigma per cell), which is what DESIGN's global tree with secure aggregation would
    give the small site at the same epsilon (without a margin for dropouts or collusion):
    an upper bound for that design, not something the product does."""
    small = _smallest(heart.sites)
    masked, _ = mask_sites(heart.sites, seed)
    sid, x, sd = heart.names[small], heart.sites[small], heart.sd
    released, ids = bank_sites(masked, heart.names, small, merge_others)
    f = FederatedIIM(n_neighbors=heart.k, epsilon=eps, delta=heart.delta, bounds=heart.bounds,
                     mode="federated", seed=seed).fit(released, site_ids=ids)
    out: dict[str, list[float]] = {"hybrid": [], "hybrid_nofed": []}
    for batch in sweep_batches(x):
        xm, r, c = _masked(x, batch)
        out["hybrid"] += ((_impute(xm, f, sid, "hybrid")[r, c] - x[r, c]) / sd[c]).tolist()
        out["hybrid_nofed"] += ((_impute(xm, f, sid, "hybrid", use_federation_in_blend=False)
                                 [r, c] - x[r, c]) / sd[c]).tolist()
    return {"seed": seed, "eps": "inf" if math.isinf(eps) else f"{eps:g}", **out}


def summarise_sweep(local: dict[str, Any], banks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per epsilon: NRMSE over all cells and banks; paired MSE differences, averaged over
    banks per cell (standard error over cells) and per bank."""
    lsq = np.square(local["local"])
    out: dict[str, Any] = {}
    for key in dict.fromkeys(b["eps"] for b in banks):
        rec = [b for b in banks if b["eps"] == key]
        sq = {m: np.square([b[m] for b in rec]) for m in ("hybrid", "hybrid_nofed")}  # (B, n)
        sq["local"] = np.broadcast_to(lsq, sq["hybrid"].shape)
        s: dict[str, Any] = {"n_cells": int(len(lsq)), "n_banks": len(rec),
                             "nrmse": {m: float(np.sqrt(v.mean())) for m, v in sq.items()}}
        for a, b in (("hybrid", "local"), ("hybrid", "hybrid_nofed"),
                     ("hybrid_nofed", "local")):
            d = (sq[a] - sq[b]).mean(axis=0)  # per cell, averaged over banks
            s[f"mse_{a}_minus_{b}"] = {
                "mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))),
                "per_bank": [float(v) for v in (sq[a] - sq[b]).mean(axis=1)]}
        out[key] = s
    return out


def markdown_sweep(summary: dict[str, Any], site: str) -> str:
    lines = [f"Smallest heart hospital ({site}), sweep: every cell of its complete rows; "
             "paired MSE differences (mean over banks per cell) ± standard error over cells",
             "", "| ε | cells | banks | local | hybrid | hybrid without federation | "
             "MSE hybrid − local | MSE hybrid − hybrid w/o fed | per bank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        n, d2 = s["nrmse"], s["mse_hybrid_minus_hybrid_nofed"]
        per = ", ".join(f"{v:+.3f}" for v in d2["per_bank"])
        lines.append(f"| {'∞' if key == 'inf' else key} | {s['n_cells']} | {s['n_banks']} | "
                     f"{fmt(n['local'])} | {fmt(n['hybrid'])} | {fmt(n['hybrid_nofed'])} | "
                     f"{_pm(s['mse_hybrid_minus_local'])} | {_pm(d2)} | {per} |")
    return "\n".join(lines)


def run_sweep(args: argparse.Namespace, epsilons: list[float]) -> int:
    t0 = time.perf_counter()
    heart = load_federation(args.study)
    jobs = [(heart, seed, eps, args.merge_others)
            for eps in epsilons for seed in range(args.sweep)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        local_f = pool.submit(sweep_local, heart)
        futures = [pool.submit(sweep_bank, *job) for job in jobs]
        banks = []
        for job, fut in zip(jobs, futures, strict=True):
            banks.append(fut.result())
            print(f"bank seed {job[1]} eps {job[2]:g} done ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        local = local_f.result()
    summary = summarise_sweep(local, banks)
    payload = {"benchmark": "small_site_sweep", "machine": machine_info(),
               "protocol": {"scenario": "heart", "site": local["site"],
                            "design": "every complete-row cell, 2 per imputation",
                            "other_sites": ("merged into one release (global-tree bound)"
                                            if args.merge_others else "one release each"),
                            "bank_seeds": list(range(args.sweep)), "epsilons": list(summary),
                            "delta": heart.delta, "k": heart.k},
               "cells": local["cells"], "local": local["local"], "banks": banks,
               "summary": summary, "total_wall_s": time.perf_counter() - t0}
    write_results(args.out, payload, indent=2)
    print(markdown_sweep(summary, local["site"]))
    print(f"\nwrote {args.out} in {payload['total_wall_s']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--study", type=Path, default=HEART,
                    help="the study whose first dataset is the federation (default: heart)")
    ap.add_argument("--seeds", type=int, default=40, help="seeds 0..N-1 (default 40)")
    ap.add_argument("--eps", default="1,4,inf", help="comma list of per-site epsilons")
    ap.add_argument("--frac", type=float, default=0.05,
                    help="fraction of each site's complete rows masked (default 0.05, the "
                         "privacy_utility protocol; larger gives more cells per seed)")
    ap.add_argument("--sweep", type=int, default=0, metavar="N",
                    help="sweep design with N banks (noise seeds) instead of random seeds")
    ap.add_argument("--jobs", type=int, default=1, help="processes for the sweep")
    ap.add_argument("--merge-others", action="store_true",
                    help="sweep: the other sites release as one (bound for a global tree)")
    ap.add_argument("--out", type=Path, default=here / "results" / "small_site.json")
    args = ap.parse_args(argv)
    epsilons = [float(e) for e in args.eps.split(",")]
    if args.sweep:
        return run_sweep(args, epsilons)
    t0 = time.perf_counter()
    heart = load_federation(args.study)
    records = []
    for seed in range(args.seeds):
        records.append(run_seed(heart, seed, epsilons, args.frac))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    summary = summarise(records)
    payload = {"benchmark": "small_site", "machine": machine_info(),
               "protocol": {"scenario": f"{args.study.name} (mask_one_attribute)",
                            "site": records[0]["site"], "seeds": list(range(args.seeds)),
                            "epsilons": list(summary), "delta": heart.delta, "k": heart.k,
                            "masked_fraction": args.frac},
               "records": records, "summary": summary,
               "total_wall_s": time.perf_counter() - t0}
    write_results(args.out, payload, indent=2)
    print(markdown(summary, records[0]["site"], args.seeds))
    print(f"\nwrote {args.out} in {payload['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
