"""Privacy-utility of federated IIM: the studies heart, ccpp, wine and ccpp_skewed as one
benchmark.

The benchmark is ``simulations/studies/{heart,ccpp,wine,ccpp_skewed}.toml``: six federations
(heart, ccpp_iid, ccpp_noniid, wine, and ccpp_skewed / ccpp_absent: a 150-row site among
three large ones, which in ccpp_absent never measures RH), their public bounds, masking,
seeds and epsilons are declared there (keys: ``simulations/studies/README.md``). This script
runs them with ``simulations.run_study`` -- each study's cells are cached under ``--work``,
so a rerun computes only what is missing -- and gathers every record into
``benchmarks/results/privacy_utility.json`` (with the summary over seeds, each private
method minus ``local`` paired by seed, and each dataset's smallest site on its own:
``simulations.small_site``), draws ``privacy_utility.png`` and
``privacy_utility_small_site.png`` beside it and prints the tables of
``benchmarks/README.md``.

Usage::

    .venv/bin/python benchmarks/privacy_utility.py
    .venv/bin/python benchmarks/privacy_utility.py --studies heart --seeds 0 --eps 1,inf \\
        --out /tmp/pu.json                   # a quick check
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from fediim.io.json_results import write_results
from simulations import Study, StudyConfigError, StudyRun, load_study, run_study
from simulations.plots import plot_nrmse
from simulations.provenance import finish_machine_info, machine_info
from simulations.small_site import (
    SMALL_SITE_TITLE,
    small_site_markdown,
    small_site_panels,
    small_site_results,
)
from simulations.summary import eps_sort_key, paired_differences, summarise
from simulations.tables import (
    eps_label,
    markdown_table,
    paired_rows,
    result_rows,
    study_eps_keys,
)

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("heart", "ccpp", "wine", "ccpp_skewed")


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _eps_list(text: str) -> list[float]:
    return [math.inf if x.lower() in ("inf", "∞") else float(x) for x in _csv_list(text)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=_csv_list, default=list(STUDIES),
                    help="comma list of study names in simulations/studies or TOML paths "
                         f"(default {','.join(STUDIES)})")
    ap.add_argument("--datasets", type=_csv_list, default=None,
                    help="only these datasets of the studies, e.g. ccpp_iid")
    ap.add_argument("--methods", type=_csv_list, default=None,
                    help="only these methods (default: each study's own)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in _csv_list(s)], default=None,
                    help="comma list of seeds (default: each study's, 0,1,2)")
    ap.add_argument("--eps", type=_eps_list, default=None,
                    help="comma list of per-site epsilons, 'inf' allowed (default: each "
                         "study's)")
    ap.add_argument("--workers", type=int, default=2, help="processes per study (default 2)")
    ap.add_argument("--work", type=Path, default=REPO / "study-output" / "privacy_utility",
                    help="each study's outputs and cell cache go to WORK/<study>")
    ap.add_argument("--out", type=Path,
                    default=REPO / "benchmarks" / "results" / "privacy_utility.json",
                    help="JSON output; the PNG goes beside it with the same stem")
    return ap.parse_args(argv)


def load_studies(args: argparse.Namespace) -> list[Study]:
    """The studies with the command line's narrowing applied."""
    studies = []
    for name in args.studies:
        path = Path(name) if name.endswith(".toml") else \
            REPO / "simulations" / "studies" / f"{name}.toml"
        study = load_study(path)
        keep = None if args.datasets is None else [
            d.name for d in study.config.datasets if d.name in args.datasets]
        if keep == []:
            continue
        studies.append(study.replace(methods=args.methods, epsilons=args.eps,
                                     seeds=args.seeds, datasets=keep))
    return studies


def _shown(path: str) -> str:
    """A path relative to the repository when it is inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else path


def eps_keys(runs: list[StudyRun]) -> list[str]:
    """Every study's epsilon keys, in budget order."""
    return sorted({k for run in runs for k in study_eps_keys(run.study)}, key=eps_sort_key)


def payload(runs: list[StudyRun], machine: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The results file: provenance, each study's configuration, every record, summaries."""
    records = [r for run in runs for r in run.records]
    return {
        "benchmark": "privacy_utility", "machine": machine,
        "studies": {run.study.name: {
            "source": _shown(run.study.source), "config": run.study.config.model_dump(),
            "code_fingerprint": run.code_fp,
            "cells": {"total": run.n_cells, "cached": run.n_cached,
                      "computed": run.n_computed}, "failures": run.failures,
            "wall_s": run.wall_s} for run in runs},
        "summary": summarise(records), "paired_vs_local": paired_differences(records),
        "small_site": small_site_results(records), "records": records,
        "total_wall_s": wall_s,
    }


def tables(runs: list[StudyRun], summary: dict[str, Any], paired: dict[str, Any],
           small: dict[str, Any]) -> str:
    """The NRMSE table (mean ± sd over seeds), the paired table and the small-site tables,
    all datasets."""
    keys = eps_keys(runs)
    head = ["dataset", "method", "no DP"] + [f"ε={eps_label(k)}" for k in keys]
    rows, paired_table = [], []
    for run in runs:
        for ds in run.study.config.datasets:
            rows += [[ds.name, *row] for row in result_rows(
                summary, ds.name, run.study.config.study.methods, keys)]
            paired_table += [[ds.name, *row] for row in paired_rows(paired, ds.name, keys)]
    return "\n\n".join([
        "Pooled NRMSE, mean ± sd over seeds (ε per site)", markdown_table(head, rows),
        "Method − local, paired by seed: mean ± standard error over seeds",
        markdown_table(["dataset", "method", *head[3:]], paired_table),
        "The smallest site of each dataset alone, NRMSE mean ± sd over seeds",
        "\n".join(small_site_markdown(small, keys, heading="####")).rstrip()])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    machine = machine_info()
    try:
        studies = load_studies(args)
    except StudyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not studies:
        print(f"error: no dataset of {', '.join(args.studies)} is named in --datasets",
              file=sys.stderr)
        return 2
    runs = [run_study(study, args.work / study.name, workers=args.workers)
            for study in studies]
    doc = payload(runs, finish_machine_info(machine), time.perf_counter() - t0)
    write_results(args.out, doc)
    delta = runs[0].study.config.study.delta
    plot_nrmse(doc["summary"], eps_keys(runs), delta, args.out.with_suffix(".png"))
    small_png = args.out.with_name(f"{args.out.stem}_small_site.png")
    panels = small_site_panels(doc["small_site"])
    if panels:
        plot_nrmse(panels, eps_keys(runs), delta, small_png, title=SMALL_SITE_TITLE)
    print(tables(runs, doc["summary"], doc["paired_vs_local"], doc["small_site"]))
    failed = sum(len(run.failures) for run in runs)
    print(f"\nwrote {args.out}, {args.out.with_suffix('.png')}"
          + (f" and {small_png}" if panels else "") + f" in {doc['total_wall_s']:.0f} s"
          + (f"; {failed} task(s) FAILED, see the study reports under {args.work}"
             if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
