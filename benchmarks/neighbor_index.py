"""Which neighbour index for which data: IIMImputer with each NeighborIndex method.

For each shape (n rows x |F| columns; synthetic, the generator of ``speed.py`` mixed into
|F| correlated columns plus noise; 1% of rows lose one attribute), IIMImputer's
fit+transform time, NRMSE and the index's recall of the 10 nearest (``NeighborIndex.recall``
on 256 rows: 1.0 for the exact methods), per method. An approximate index may be
``"auto"``'s choice only where this table shows it faster at equal accuracy.

Usage::

    .venv/bin/python benchmarks/neighbor_index.py [--shapes 20000x8,20000x32,60000x32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import apply_mask, mask_rows, nrmse, synthetic

from fediim import IIMImputer
from fediim.impute.neighbors import NeighborIndex
from fediim.io.json_results import write_results

METHODS = ("kdtree", "blas", "hnsw")


def wide_synthetic(n: int, width: int, seed: int = 0) -> np.ndarray:
    """``width`` correlated columns: random mixtures of the 9 synthetic ones, plus noise."""
    base = synthetic(n, 9, seed=seed)
    base = (base - base.mean(axis=0)) / base.std(axis=0)
    if width <= 9:
        return base[:, :width]
    rng = np.random.default_rng(seed + 1)
    mixed = base @ rng.normal(size=(9, width)) / 3.0
    return mixed + 0.1 * rng.standard_normal(mixed.shape)


def one_case(n: int, width: int, method: str) -> dict[str, Any]:
    x = wide_synthetic(n, width)
    rows, cols = mask_rows(n, width, seed=0, frac=0.01)
    holes = apply_mask(x, rows, cols)
    start = time.perf_counter()
    out = IIMImputer(neighbor_index=method).fit_transform(holes)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    recall = NeighborIndex(np.delete(x, 0, axis=1), method).recall(10)  # type: ignore[arg-type]
    return {"n": n, "features": width - 1, "method": method, "time_s": elapsed,
            "recall_at_10": recall, "nrmse": nrmse(out, x, rows, cols)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="20000x8,20000x32,60000x32")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "neighbor_index.json")
    args = parser.parse_args(argv)
    from simulations.provenance import finish_machine_info, machine_info

    payload: dict[str, Any] = {"benchmark": "neighbor_index", "machine": machine_info(),
                               "cases": []}
    print("| n | \\|F\\| | index | time (s) | recall@10 | NRMSE |\n|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, width = (int(value) for value in shape.split("x"))
        for method in METHODS:
            case = one_case(n, width, method)
            payload["cases"].append(case)
            print(f"| {n:,} | {case['features']} | {method} | {case['time_s']:.1f} "
                  f"| {case['recall_at_10']:.3f} | {case['nrmse']:.4f} |", flush=True)
            write_results(args.out, payload, indent=2)
    payload["machine"] = finish_machine_info(payload["machine"])
    write_results(args.out, payload, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
