"""Small, wide, gappy tables: IIM against KNNImputer and the column mean (issue 15).

For each shared dataset with at least 9 columns (ccs, wine_red, wine_white) and UCI Heart's
Cleveland: its first 80 complete rows; each cell is lost with probability 8%
(``np.random.default_rng(seed).random(shape) < 0.08``), seeds 0, 1, 2. NRMSE is pooled over
the lost cells, each error divided by its column's std over the 80 rows (ddof=0; 1 where
constant). Methods as in ``simulations.baselines`` (``iim``: ``IIMImputer()`` defaults);
``iim_before`` (``--methods``) is IIM without local quadratic models and the per-pattern
blend, as it was before they became the defaults.

Usage::

    .venv/bin/python benchmarks/small_tables.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import BEFORE_IIM_OPTIONS, DEFAULT_DATASETS, load_csv

from fediim.io.json_results import write_results
from simulations.baselines import impute_table
from simulations.provenance import finish_machine_info, machine_info

DATASETS = {"ccs": "ccs.csv", "wine_red": "wine_red.csv", "wine_white": "wine_white.csv",
            "cleveland": "heart/cleveland.csv"}
METHODS = ("iim", "knn", "mean")
N_ROWS = 80
MISSING_CELL_RATE = 0.08
SEEDS = (0, 1, 2)
#: Methods beyond ``simulations.baselines``': the baseline they run and its IIM options.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"iim_before": ("iim", BEFORE_IIM_OPTIONS)}


def small_table(path: Path) -> np.ndarray:
    """The first :data:`N_ROWS` complete rows of a CSV."""
    values, _ = load_csv(path)
    return values[~np.isnan(values).any(axis=1)][:N_ROWS]


def run_seed(table: np.ndarray, seed: int, method: str) -> tuple[float, float]:
    """NRMSE over the lost cells and the wall time of one method on one seed's mask."""
    lost = np.random.default_rng(seed).random(table.shape) < MISSING_CELL_RATE
    masked = np.where(lost, np.nan, table)
    start = time.perf_counter()
    baseline, options = VARIANTS.get(method, (method, None))
    imputed = impute_table(baseline, masked, k=10, seed=seed, iim_options=options).values
    elapsed = time.perf_counter() - start
    scale = table.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    errors = ((imputed - table) / scale)[lost]
    return float(np.sqrt(np.mean(errors**2))), elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list from {','.join([*METHODS, *VARIANTS])}")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent
                        / "results" / "small_tables.json")
    args = parser.parse_args(argv)
    methods = [method for method in args.methods.split(",") if method]
    summary: dict[str, dict[str, Any]] = {}
    for name, file in DATASETS.items():
        table = small_table(args.datasets / file)
        for method in methods:
            runs = [run_seed(table, seed, method) for seed in SEEDS]
            summary.setdefault(name, {})[method] = {
                "nrmse_by_seed": [run[0] for run in runs],
                "nrmse_mean": float(np.mean([run[0] for run in runs])),
                "time_median_s": float(np.median([run[1] for run in runs]))}
        cells = summary[name]
        print(f"| {name} | " + " | ".join(
            f"{cells[m]['nrmse_mean']:.3f} (" + " / ".join(
                f"{v:.3f}" for v in cells[m]["nrmse_by_seed"]) + ")" for m in methods) + " |")
    payload = {"benchmark": "small_tables", "machine": finish_machine_info(machine_info()),
               "protocol": {"rows": N_ROWS, "missing_cell_rate": MISSING_CELL_RATE,
                            "seeds": list(SEEDS), "datasets": DATASETS},
               "summary": summary}
    write_results(args.out, payload, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
