"""Secure aggregation against per-site releases: the same sites, masks, budgets and seeds.

For each study dataset, seed and ε, one bank per aggregation (``per-site``: every site
releases its own cells; ``secure``: the three secure sums of
:mod:`fediim.federated.secure_release`, threshold = two thirds of the sites), then every
site imputes from it in ``federated`` (bank only) and ``hybrid`` mode. Also scored: the
centralized IIM on all sites' rows pooled (the ceiling) and each site's local IIM.
Reports pooled NRMSE and the smallest site's, per cell the mean over seeds.

Usage::

    .venv/bin/python benchmarks/secure_aggregation.py            # all studies, ~15 min
    .venv/bin/python benchmarks/secure_aggregation.py --studies ccpp --eps 1 --seeds 0
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fediim.federated import FederatedIIM, site_impute
from fediim.io.json_results import write_results
from simulations import load_study
from simulations.methods import Prepared, _run_public, prepare, score
from simulations.provenance import finish_machine_info, machine_info

REPO = Path(__file__).resolve().parents[1]
STUDIES = {"heart": ["heart"], "wine": ["wine"], "ccpp": ["ccpp_iid", "ccpp_noniid"],
           "ccpp_skewed": ["ccpp_skewed", "ccpp_absent"], "diabetes": ["diabetes"]}
AGGREGATIONS = ("per-site", "secure")
MODES = ("federated", "hybrid")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", default=",".join(STUDIES), help="comma list of study files "
                    f"in simulations/studies (default {','.join(STUDIES)})")
    ap.add_argument("--eps", default="1,4,inf", help="comma list of budgets (default 1,4,inf)")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "secure_aggregation.json")
    return ap.parse_args(argv)


def _scores(out: list[np.ndarray], p: Prepared, small: str) -> dict[str, float]:
    result = score(out, p)
    return {"nrmse": result["nrmse"], "nrmse_small": result["nrmse_site"][small]}


def private_cells(p: Prepared, epsilon: float, seed: int, delta: float, k: int
                  ) -> dict[str, Any]:
    """Both aggregations' banks for one cell, every site imputing in every mode."""
    clip = [column not in p.fed.code_columns for column in p.fed.columns]
    small = min(zip(p.fed.site_names, p.masked, strict=True), key=lambda s: len(s[1]))[0]
    cells: dict[str, Any] = {}
    for aggregation in AGGREGATIONS:
        t0 = time.perf_counter()
        model = FederatedIIM(n_neighbors=k, epsilon=epsilon, delta=delta, bounds=p.fed.bounds,
                             seed=seed, clip_columns=clip, aggregation=aggregation
                             ).fit(p.masked, site_ids=p.fed.site_names)
        fit_s = time.perf_counter() - t0
        for mode in MODES:
            out = [site_impute(x, model.bank_, model.bounds_, mode=mode, n_neighbors=k,
                               site_id=site).values
                   for x, site in zip(p.masked, p.fed.site_names, strict=True)]
            cells[f"{aggregation}/{mode}"] = {**_scores(out, p, small), "fit_s": fit_s,
                                             "bank_cells": model.bank_.n_cells}
    return cells


def public_cells(p: Prepared, seed: int, k: int) -> dict[str, Any]:
    small = min(zip(p.fed.site_names, p.masked, strict=True), key=lambda s: len(s[1]))[0]
    return {method: _scores(_run_public(method, p, k, seed), p, small)
            for method in ("centralized", "local")}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    budgets = [math.inf if e.strip() in ("inf", "∞") else float(e) for e in args.eps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    records = []
    for name in args.studies.split(","):
        study = load_study(REPO / "simulations" / "studies" / f"{name}.toml")
        settings = study.config.study
        for index, dataset in enumerate(study.config.datasets):
            for seed in seeds:
                p = prepare(study, index, seed)
                base = {"dataset": dataset.name, "seed": seed, "sites": len(p.masked)}
                records.append({**base, "epsilon": None, **public_cells(p, seed, settings.k)})
                for epsilon in budgets:
                    cells = private_cells(p, epsilon, seed, settings.delta, settings.k)
                    records.append({**base, "epsilon": epsilon, **cells})
                    print(f"{dataset.name} seed {seed} eps {epsilon}: " + ", ".join(
                        f"{key} {value['nrmse']:.3f}" for key, value in cells.items()),
                        flush=True)
    return records


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, ε): every method's mean NRMSE (pooled and smallest site) over seeds,
    with the public references beside each ε."""
    rows = []
    datasets = dict.fromkeys(r["dataset"] for r in records)
    for dataset in datasets:
        public = [r for r in records if r["dataset"] == dataset and r["epsilon"] is None]
        references = {f"{method}{suffix}": float(np.mean([r[method][key] for r in public]))
                      for method in ("centralized", "local")
                      for suffix, key in (("", "nrmse"), (" small", "nrmse_small"))}
        budgets = dict.fromkeys(r["epsilon"] for r in records
                                if r["dataset"] == dataset and r["epsilon"] is not None)
        for epsilon in budgets:
            cell = [r for r in records if r["dataset"] == dataset and r["epsilon"] == epsilon]
            means = {f"{key}{suffix}": float(np.mean([r[key][field] for r in cell]))
                     for key in (f"{a}/{m}" for a in AGGREGATIONS for m in MODES)
                     for suffix, field in (("", "nrmse"), (" small", "nrmse_small"))}
            rows.append({"dataset": dataset, "epsilon": epsilon, **references, **means})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = ["centralized", "per-site/federated", "secure/federated", "per-site/hybrid",
            "secure/hybrid", "local"]
    head = "| dataset | ε | " + " | ".join(keys) + " | small site: per-site → secure hybrid |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for row in rows:
        eps = "∞" if math.isinf(row["epsilon"]) else f"{row['epsilon']:g}"
        values = " | ".join(f"{row[key]:.3f}" for key in keys)
        lines.append(f"| {row['dataset']} | {eps} | {values} | "
                     f"{row['per-site/hybrid small']:.3f} → {row['secure/hybrid small']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0, machine = time.perf_counter(), machine_info()
    records = run(args)
    rows = summary(records)
    write_results(args.out, {"benchmark": "secure_aggregation",
                             "machine": finish_machine_info(machine),
                             "args": {**vars(args), "out": str(args.out)},
                             "seconds": time.perf_counter() - t0, "summary": rows,
                             "records": records})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
