"""The small site of ``ccpp_skewed.toml``, fast: one seed and budget, always recomputed.

Runs the study ``simulations/studies/ccpp_skewed.toml`` (narrowed to the seeds, budgets,
methods and datasets given) with ``simulations.run_study`` on the current code, with its
cell cache in a temporary folder that is deleted afterwards, so an engine change always
shows. Prints the small site's NRMSE per method (one row per seed, then the report's
small-site tables: mean ± sd over the seeds, the paired hybrid − local and
hybrid − min(local, federated), and in ccpp_absent the never-measured RH column).

Usage::

    .venv/bin/python benchmarks/skewed_quick.py                 # seed 0, ε = 1, ~1 min
    .venv/bin/python benchmarks/skewed_quick.py --seeds 0,1,2 --eps 1,4
    .venv/bin/python benchmarks/skewed_quick.py --datasets ccpp_absent \
        --methods centralized,federated
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from simulations import StudyConfigError, StudyRun, load_study, run_study
from simulations.small_site import (
    SMALL_SITE_METHODS,
    small_site_markdown,
    small_site_results,
    smallest_site,
)
from simulations.tables import aligned_table, fmt, study_eps_keys

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "simulations" / "studies" / "ccpp_skewed.toml"


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, default=STUDY, help="the study TOML (default: "
                    "simulations/studies/ccpp_skewed.toml)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in _csv_list(s)], default=[0],
                    help="comma list of seeds (default 0)")
    ap.add_argument("--eps", type=lambda s: [math.inf if x.lower() in ("inf", "∞")
                                             else float(x) for x in _csv_list(s)],
                    default=[1.0], help="comma list of per-site budgets, 'inf' allowed "
                                        "(default 1)")
    ap.add_argument("--methods", type=_csv_list, default=list(SMALL_SITE_METHODS),
                    help=f"comma list (default {','.join(SMALL_SITE_METHODS)})")
    ap.add_argument("--datasets", type=_csv_list, default=None,
                    help="only these datasets (default: all of the study's)")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    return ap.parse_args(argv)


def per_seed_rows(run: StudyRun) -> tuple[list[str], list[list[str]]]:
    """One row per (dataset, seed, method, ε; "-" without a budget): the small site's NRMSE
    and, where it never measures a column, its NRMSE on that column ("—": the method left
    it empty)."""
    records = run.records
    head = ["dataset", "seed", "method", "ε", "small-site NRMSE", "never-measured column"]
    rows = []
    for r in records:
        site = smallest_site(records, r["dataset"])
        assert site is not None
        absent = r.get("nrmse_absent", {}).get(site, {})
        never = ", ".join(f"{c} {fmt(v)}" for c, v in absent.items())
        rows.append([r["dataset"], str(r["seed"]), r["method"], r["epsilon"] or "-",
                     fmt(r["nrmse_site"][site]), never])
    return head, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        study = load_study(args.study).replace(seeds=args.seeds, epsilons=args.eps,
                                               methods=args.methods, datasets=args.datasets)
    except StudyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="skewed-quick-") as tmp:
        run = run_study(study, tmp, cache_dir=Path(tmp) / "cache", workers=args.workers,
                        progress=False, write=False)
    head, rows = per_seed_rows(run)
    small: dict[str, Any] = small_site_results(run.records)
    print(aligned_table(head, rows))
    print()
    print("\n".join(small_site_markdown(small, study_eps_keys(study), heading="##")).rstrip())
    for f in run.failures:
        print(f"FAILED {f['task']}: {f['error'].splitlines()[0]}", file=sys.stderr)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
