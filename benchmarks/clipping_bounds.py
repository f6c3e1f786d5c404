"""How tight and how safe are a site's private clipping boxes? (issue 13, "private clipping")

For ccpp, wine and heart (the privacy-utility studies' data and public bounds, all rows of
a dataset pooled), a site of n records is drawn at random (n = 150, 300, 2400; heart has
920 rows, so its largest site is all of them). Its box comes from
``fediim.federated.clipping.private_clip_box`` for several (quantiles, margin) choices,
exact (ε = ∞) and private with a share of a total budget ε (δ = 1e-6). Per site it
records, over the observed cells of the site's own records:

    cells   fraction of cells clamped by the box
    rows    fraction of records with at least one cell clamped
    width   mean box width over columns (public range = 1)
    err     mean |lo - lo_exact| + |hi - hi_exact| over columns (private runs only)

Usage::

    nice -n 10 .venv/bin/python benchmarks/clipping_bounds.py              # ~2 min
    .venv/bin/python benchmarks/clipping_bounds.py --seeds 3 --eps 1 --shares 0.1
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from fediim.federated.clipping import clamp_to_box, clip_min_records, private_clip_box
from fediim.federated.plan import scale_to_bounds
from fediim.io.json_results import write_results
from fediim.privacy import PrivacyLedger, SeededGaussianNoise, epsilon_to_rho
from simulations import load_study
from simulations.data import cached_raw
from simulations.provenance import finish_machine_info, machine_info

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {"ccpp": "ccpp.toml", "wine": "wine.toml", "heart": "heart.toml"}
#: Columns left at their public bounds (no budget): codes whose public range is their value
#: set, so a box cannot be narrower, while a noisy quantile of a two-valued column lands
#: anywhere between the two values and clamps half the records.
UNCLIPPED = {"heart": ("sex", "cp", "fbs", "restecg", "exang", "num")}
SIZES = (150, 300, 2400)
DELTA = 1e-6
#: (lower, upper quantile, margin) choices compared.
CONFIGS: tuple[tuple[float, float, float], ...] = (
    (0.01, 0.99, 0.25), (0.05, 0.95, 0.25), (0.05, 0.95, 0.5), (0.1, 0.9, 0.5),
    (0.1, 0.9, 1.0), (0.25, 0.75, 2.0), (0.25, 0.75, 3.0),
)


def pooled_scaled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the study's first dataset, scaled to its public bounds, and which of its
    columns get a box."""
    study = load_study(ROOT / "simulations" / "studies" / STUDIES[name])
    raw = cached_raw(study, 0)
    bmap = study.bounds_for(study.config.datasets[0])
    bounds = np.array([bmap[c] for c in raw.columns], dtype=np.float64)
    scaled, _ = scale_to_bounds(np.vstack(raw.tables), bounds)
    clip = np.array([c not in UNCLIPPED.get(name, ()) for c in raw.columns])
    return scaled, clip


def box_metrics(x: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                clip: np.ndarray) -> dict[str, float]:
    """Clamped cell and row fractions (observed cells only) and the mean width of the
    clipped columns' boxes."""
    _, moved = clamp_to_box(x, lo, hi)
    with np.errstate(invalid="ignore"):
        row_hit = np.any((x < lo) | (x > hi), axis=1)
    return {"cells": float(moved.sum() / np.sum(~np.isnan(x))),
            "rows": float(row_hit.mean()), "width": float(np.mean((hi - lo)[clip]))}


def one_site(x: np.ndarray, clip: np.ndarray, cfg: tuple[float, float, float], rho: float,
             seed: int) -> dict[str, float]:
    """The box of one site at ``rho`` (inf = exact) and its metrics (vs the exact box)."""
    kw = {"quantiles": (cfg[0], cfg[1]), "margin": cfg[2], "clip_columns": clip}
    exact = private_clip_box(x, math.inf, ledger=None, **kw)
    if math.isinf(rho):
        return box_metrics(x, *exact, clip)
    ledger = PrivacyLedger.in_memory(rho, "site")
    box = private_clip_box(x, rho, ledger=ledger, noise=SeededGaussianNoise(seed), **kw)
    err = np.mean((np.abs(box[0] - exact[0]) + np.abs(box[1] - exact[1]))[clip])
    return {**box_metrics(x, *box, clip), "err": float(err)}


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over the runs (and the worst clamped-cell fraction)."""
    out = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    out["cells_max"] = float(np.max([r["cells"] for r in runs]))
    return out


def run(seeds: int, eps_list: list[float], shares: list[float]) -> dict[str, Any]:
    """Every dataset x site size x config x budget, averaged over ``seeds`` sites."""
    results: dict[str, Any] = {}
    for name in STUDIES:
        data, clip = pooled_scaled(name)
        budgets = [(e, sh) for e in eps_list for sh in (shares if math.isfinite(e) else [1])]
        for n, cfg, (eps, share) in itertools.product(SIZES, CONFIGS, budgets):
            n = min(n, len(data))
            rho = math.inf if math.isinf(eps) else share * epsilon_to_rho(eps, DELTA)
            runs = []
            for seed in range(seeds):
                rows = np.random.default_rng(seed).permutation(len(data))[:n]
                runs.append(one_site(data[rows], clip, cfg, rho, seed))
            key = f"{name}/n={n}/q={cfg[0]}-{cfg[1]}/margin={cfg[2]}/eps={eps}/share={share}"
            n_min = clip_min_records(rho, int(clip.sum()), quantiles=(cfg[0], cfg[1]))
            results[key] = {**summarise(runs), "n_over_min": n / n_min}
            print(key, {k: round(v, 4) for k, v in results[key].items()}, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--eps", default="inf,1,4", help="comma list of total budgets")
    ap.add_argument("--shares", default="0.05,0.1", help="comma list: shares of rho for the box")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/clipping_bounds.json")
    args = ap.parse_args()
    eps_list = [float(e) for e in args.eps.split(",")]
    shares = [float(x) for x in args.shares.split(",")]
    machine = machine_info()
    results = run(args.seeds, eps_list, shares)
    write_results(args.out, {"benchmark": "clipping_bounds",
                             "machine": finish_machine_info(machine),
                             "config": {"seeds": args.seeds, "eps": eps_list, "shares": shares,
                                        "delta": DELTA, "sizes": list(SIZES),
                                        "unclipped": UNCLIPPED},
                             "results": results})


if __name__ == "__main__":
    main()
