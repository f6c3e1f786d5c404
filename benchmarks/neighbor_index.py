"""Which neighbour index for which data: IIMImputer with each NeighborIndex method.

A grid of shapes (n rows x |F| features per pattern; synthetic: the generator of
``speed.py`` mixed into |F| + 1 correlated columns plus noise; 1% of rows lose one
attribute; from ``--one-target-from`` rows on only the last column does, so the cell
builds one pattern's index) x methods. Per cell, in its own process with BLAS, OpenMP
(faiss) and KD-tree threads fixed (``--threads``): IIMImputer's fit+transform wall and
CPU time, the load average around it, NRMSE, peak RSS, and the recall of the 10 nearest
that the approximate index measured on each pattern's index when built (its worst; 1.0
for the exact methods).
A cell is skipped when its time, extrapolated from the same method's previous n, exceeds
``--cap`` CPU seconds. ``"auto"`` may pick an approximate index only where this table
shows it faster at equal accuracy.

Usage::

    .venv/bin/python benchmarks/neighbor_index.py [--n 10000,30000,100000,1000000]
        [--features 7,15,31,63] [--cap 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import apply_mask, mask_rows, nrmse, synthetic

import fediim.impute.iim as iim
import fediim.impute.neighbors as nb
from fediim import IIMImputer
from fediim.io.json_results import write_results

METHODS = ("kdtree", "blas", "hnsw")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def wide_synthetic(n: int, width: int, seed: int = 0) -> np.ndarray:
    """``width`` correlated columns: random mixtures of the 9 synthetic ones, plus noise."""
    base = synthetic(n, 9, seed=seed)
    base = (base - base.mean(axis=0)) / base.std(axis=0)
    if width <= 9:
        return base[:, :width]
    rng = np.random.default_rng(seed + 1)
    mixed = base @ rng.normal(size=(9, width)) / 3.0
    return mixed + 0.1 * rng.standard_normal(mixed.shape)


class _RecordedIndex(nb.NeighborIndex):
    """A NeighborIndex that keeps a list of every instance the imputer builds."""

    built: list[nb.NeighborIndex] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _RecordedIndex.built.append(self)


def one_cell(n: int, features: int, method: str, threads: int, one_target: bool
             ) -> dict[str, Any]:
    """IIMImputer(neighbor_index=method) on n x (features + 1), in this process; with
    ``one_target`` only the last column loses values (one pattern, one index)."""
    nb.KDTREE_WORKERS = threads
    x = wide_synthetic(n, features + 1)
    rows, cols = mask_rows(n, features + 1, seed=0, frac=0.01)
    if one_target:
        cols[:] = features
    holes = apply_mask(x, rows, cols)
    iim.NeighborIndex = _RecordedIndex  # type: ignore[misc]
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    out = IIMImputer(neighbor_index=method).fit_transform(holes)  # type: ignore[arg-type]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    built = _RecordedIndex.built
    return {"n": n, "features": features, "method": method, "threads": threads,
            "targets": "one" if one_target else "all",
            "wall_s": wall, "cpu_s": cpu, "load_before": load_before,
            "load_after": os.getloadavg()[0], "nrmse": nrmse(out, x, rows, cols),
            "recall_at_10": min(index.recall_at_build for index in built),
            "indexes": len(built), "methods_used": sorted({index.method for index in built}),
            "max_depth": max((getattr(index, "depth", 0) for index in built), default=0),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def growth(n_before: int, n_after: int) -> float:
    """How much more work ``n_after`` rows take than ``n_before``: queries grow with n, and
    up to iim.FULL_VALIDATION_ROWS (every row validates) so does each exact query."""
    full = iim.FULL_VALIDATION_ROWS
    return (n_after / n_before) * (min(n_after, full) / min(n_before, full))


def _children_cpu_s() -> float:
    """CPU seconds of this process's reaped children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cell(n: int, features: int, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One cell in a child process (its own peak RSS), stopped after ``4 * cap`` wall s."""
    env = {**os.environ, **{name: str(args.threads) for name in THREAD_VARIABLES}}
    command = [sys.executable, __file__, "--cell", f"{n},{features},{method}",
               "--threads", str(args.threads)]
    if n >= args.one_target_from:
        command.append("--one-target")
    children_cpu = _children_cpu_s()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=4 * args.cap, check=True)
    except subprocess.TimeoutExpired:  # run() kills and reaps the child: its CPU counts
        return {"n": n, "features": features, "method": method,
                "skipped": f"stopped after {4 * args.cap:.0f} s wall, "
                           f"{_children_cpu_s() - children_cpu:.0f} CPU s"}
    except subprocess.CalledProcessError as error:
        return {"n": n, "features": features, "method": method,
                "skipped": f"failed: {error.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(case: dict[str, Any]) -> str:
    """The README table row of a case."""
    head = f"| {case['n']:,} | {case['features']} | {case['method']} |"
    if "skipped" in case:
        return f"{head} — | — | — | — | — | — | {case['skipped']} |"
    return (f"{head} {case['cpu_s']:.1f} | {case['wall_s']:.1f} | "
            f"{case['load_before']:.1f} | {case['recall_at_10']:.3f} | {case['nrmse']:.4f} "
            f"| {case['peak_rss_gib']:.2f} | |")


def next_case(n: int, features: int, method: str, before: dict[str, Any] | None,
              args: argparse.Namespace) -> dict[str, Any]:
    """The cell's result, or why it is skipped: its CPU time extrapolated from the same
    method's previous n (``before``; None: skipped or none; per pattern when the
    number of patterns changes) exceeds the cap."""
    if before is None and n != min(int(value) for value in args.n.split(",")):
        return {"n": n, "features": features, "method": method,
                "skipped": "a smaller n was skipped"}
    patterns = {n_: 1 if n_ >= args.one_target_from else features + 1
                for n_ in (n, before["n"] if before else n)}
    estimate = (before["cpu_s"] * growth(before["n"], n) * patterns[n] / patterns[before["n"]]
                if before else 0.0)
    if estimate > args.cap:
        return {"n": n, "features": features, "method": method,
                "skipped": f"estimated {estimate:.0f} CPU s > cap {args.cap:.0f}"}
    return run_cell(n, features, method, args)


def grid(args: argparse.Namespace, payload: dict[str, Any],
         done: dict[tuple[int, int, str], dict[str, Any]]) -> None:
    """Every cell of the grid, smallest n first, features in the order given (cells in
    ``done`` are kept as they are)."""
    last: dict[tuple[int, str], dict[str, Any]] = {}
    for n in sorted(int(value) for value in args.n.split(",")):
        for features in (int(value) for value in args.features.split(",")):
            for method in args.methods.split(","):
                case = done.get((n, features, method)) or next_case(
                    n, features, method, last.get((features, method)), args)
                if "skipped" in case:
                    last.pop((features, method), None)
                else:
                    last[(features, method)] = case
                payload["cases"].append(case)
                print(row(case), flush=True)
                write_results(args.out, payload, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="10000,30000,100000,1000000")
    parser.add_argument("--features", default="7,15,31,63")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cap", type=float, default=300.0, help="CPU seconds per cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cell", help="n,features,method: run one cell, print its JSON")
    parser.add_argument("--one-target-from", type=int, default=100_000,
                        help="from this n on, only the last column loses values")
    parser.add_argument("--one-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the measured cells of --out instead of rerunning them")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "neighbor_index.json")
    args = parser.parse_args(argv)
    if args.cell:
        n, features, method = args.cell.split(",")
        print(json.dumps(one_cell(int(n), int(features), method, args.threads,
                                  args.one_target)))
        return 0
    from simulations.provenance import finish_machine_info, machine_info

    payload: dict[str, Any] = {"benchmark": "neighbor_index", "machine": machine_info(),
                               "threads": args.threads, "cap_cpu_s": args.cap, "cases": []}
    print("| n | \\|F\\| | index | CPU (s) | wall (s) | load | recall@10 | NRMSE | peak RSS "
          "(GiB) | skipped |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    done = {}
    if args.resume and args.out.exists():
        done = {(case["n"], case["features"], case["method"]): case
                for case in json.loads(args.out.read_text())["cases"] if "skipped" not in case}
    grid(args, payload, done)
    payload["machine"] = finish_machine_info(payload["machine"])
    write_results(args.out, payload, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
