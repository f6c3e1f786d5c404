"""The ``make demo`` job: a four-hospital privacy–utility study, then the CLI on one table.

Run as ``python -m fediim.cli.demo``. It is the study ``simulations/studies/diabetes.toml``
(:data:`DEMO_STUDY` below, the same settings) on scikit-learn's bundled diabetes data
(442 patients x 10 attributes; no download):

- four hospitals A, B, C, D hold 40 / 30 / 20 / 10 % of the patients (a seeded shuffle);
- in 20% of each hospital's complete records one random attribute is hidden (the IIM
  paper's protocol), seeds 0, 1, 2;
- each hospital fills its gaps alone (``local``), from the federation's private model bank
  (``federated``) or both blended (``hybrid``) at a privacy budget of epsilon = 1, 4 and
  infinity per hospital (delta = 1e-6); for reference, not private, with all records
  pooled (``centralized`` IIM, scikit-learn ``knn``, the column ``mean``).

It prints the error of each method at each budget,

    NRMSE = sqrt(mean over hidden cells of ((imputed - truth) / attribute std)^2)

(0 is perfect, about 1 is as bad as the column mean), the privacy each hospital spent,
and writes ``demo-output/report.md`` with its plots. Finished cells are cached in
``demo-output/cache`` (a rerun reuses them; delete the folder to recompute). Finally it
runs ``fediim impute`` on hospital D's masked table to show the files a user gets.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fediim.cli.command import main as cli_main
from fediim.cli.impute import default_sidecar_paths
from fediim.io.table import write_csv

__all__ = ["DEMO_STUDY", "demo_study", "main"]

#: The demo's study, key for key the same as ``simulations/studies/diabetes.toml``.
DEMO_STUDY: dict[str, Any] = {
    "study": {
        "name": "diabetes",
        "title": "Four hospitals, one shared schema: what does privacy cost?",
        "description": (
            "Four hospitals hold 40%, 30%, 20% and 10% of 442 diabetes patients (age, sex, "
            "body mass\nindex, blood pressure and six blood serum measurements). In 20% of "
            "each hospital's\ncomplete records one attribute is hidden; each hospital then "
            "fills its gaps alone\n(`local`), with the federation's privately released "
            "statistics (`federated`, `hybrid`),\nor -- for reference, not private -- with "
            "everybody's raw records pooled (`centralized`,\n`knn`, `mean`)."),
        "methods": ["local", "federated", "hybrid", "centralized", "knn", "mean"],
        "epsilons": [1, 4, math.inf],
        "delta": 1e-6,
        "seeds": [0, 1, 2],
        "k": 10,
    },
    "missingness": {"mechanism": "one_attribute", "rate": 0.2},
    "datasets": [{
        "name": "diabetes",
        "builtin": "diabetes",
        "partition": {"kind": "size_skew", "sizes": [0.4, 0.3, 0.2, 0.1],
                      "site_names": ["A", "B", "C", "D"]},
    }],
    "bounds": {
        "age": [0, 120], "sex": [1, 2], "bmi": [10, 70], "bp": [40, 200], "s1": [50, 500],
        "s2": [0, 400], "s3": [0, 150], "s4": [0, 15], "s5": [2, 8], "s6": [40, 300],
    },
}


def demo_study(seeds: Sequence[int] | None = None) -> Any:
    """:data:`DEMO_STUDY` validated (optionally with other seeds, e.g. for a quick test)."""
    from simulations.config import study_from_dict

    raw = {**DEMO_STUDY, "study": dict(DEMO_STUDY["study"])}
    if seeds is not None:
        raw["study"]["seeds"] = list(seeds)
    return study_from_dict(raw, source="simulations/studies/diabetes.toml")


def bounds_span_sd() -> tuple[float, float]:
    """Median and widest public bound, in standard deviations of the attribute.

    The Gaussian noise is calibrated to the public bounds, not to the data's spread, so
    this ratio says how loud a given budget is on this data.
    """
    import numpy as np
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    b = np.array([DEMO_STUDY["bounds"][c] for c in d.feature_names], dtype=np.float64)
    span = (b[:, 1] - b[:, 0]) / d.data.std(axis=0)
    return float(np.median(span)), float(span.max())


def _privacy_table(summary: dict[str, Any], study: Any, rows: dict[str, int]) -> str:
    from simulations.config import eps_key

    cells = summary["diabetes"][study.private_methods[0]]
    keys = [eps_key(e) for e in study.config.study.epsilons]
    head = ["site", "patients"] + [f"ε={'∞' if k == 'inf' else k}" for k in keys]
    body = []
    for site, n in rows.items():
        row = [site, str(n)]
        for k in keys:
            p = (cells.get(k, {}).get("privacy_site") or {}).get(site)
            row.append("none (no noise)" if k == "inf" else
                       "" if p is None else f"{p['epsilon_spent']:.2f} of {k}")
        body.append(row)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in [head, *body])


def _cli_walkthrough(study: Any, out: Path) -> int:
    """``fediim impute`` on hospital D's masked table (seed 0)."""
    from simulations.methods import prepare

    p = prepare(study, 0, study.config.study.seeds[0])
    site = p.fed.site_names[-1]
    x = p.masked[-1]
    src = out / f"hospital_{site}_masked.csv"
    dst = out / f"hospital_{site}_imputed.csv"
    write_csv(src, x, p.fed.columns, float_format=None)
    argv = ["impute", str(src), "-o", str(dst)]
    print(f"\nthe same gaps at one hospital with the command line (hospital {site}, seed "
          f"{study.config.study.seeds[0]}, no federation):")
    print(f"  $ fediim {' '.join(argv)}")
    sys.stdout.flush()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(argv)
    for line in err.getvalue().splitlines():
        print(f"  {line}")
    if code != 0:
        return code
    flags, audit = default_sidecar_paths(dst)
    for path, what in ((dst, "the imputed table (observed cells unchanged)"),
                       (flags, "per cell: imputed (0/1) and uncertainty"),
                       (audit, "one JSON line per imputed cell: method, k, candidates")):
        print(f"  {str(path):<44}  {what}")
    return 0


def main(out_dir: str | os.PathLike[str] = "demo-output", *,
         seeds: Sequence[int] | None = None, workers: int = 2,
         progress: bool | None = None) -> int:
    """Run the demo, writing under ``out_dir``; return 0 on success."""
    from simulations.report import summarise, table_text
    from simulations.runner import run_study

    study = demo_study(seeds)
    s = study.config.study
    out = Path(out_dir)
    t0 = time.perf_counter()
    print("fediim demo: four hospitals fill gaps in their records, alone or together under "
          "differential privacy")
    print("  data: scikit-learn's diabetes table, 442 patients x 10 attributes (age, sex, "
          "bmi, bp, s1-s6)")
    print("  hospitals A, B, C, D hold 40/30/20/10% of the patients; in 20% of each one's "
          "complete records")
    print(f"  one random attribute is hidden (seeds {', '.join(map(str, s.seeds))}); "
          "budgets ε = 1, 4, ∞ per hospital, δ = 1e-6\n")
    sys.stdout.flush()
    run = run_study(study, out, workers=workers,
                    progress=sys.stderr.isatty() if progress is None else progress,
                    log=lambda _msg: None)
    if run.failures:
        for f in run.failures:
            print(f"error: {f['task']}: {f['error']}", file=sys.stderr)
        return 1
    summary = summarise(run.records)
    rows = run.records[0]["n_rows_site"]
    print(f"NRMSE, mean ± sd over {len(s.seeds)} seed(s) (lower is better; 0 = perfect, "
          "~1 = as bad as the column mean):\n")
    print("\n".join("  " + line for line in
                    table_text(summary, study, "diabetes", markdown=False).splitlines()))
    print("\n  local: each hospital alone, nothing shared · federated: the private model bank "
          "only ·\n  hybrid: bank + the hospital's own model · centralized / knn / mean: all "
          "records pooled (NOT private)")
    print("\nprivacy spent per hospital (ε of its budget; `local` spends nothing):\n")
    print(_privacy_table(summary, study, rows))

    res = summary["diabetes"]
    small = run.records[0]["sites"][-1]
    loc, mean = res.get("local", {}).get("-"), res.get("mean", {}).get("-")
    hyb, fed = res.get("hybrid", {}).get("1"), res.get("federated", {}).get("1")
    print()
    if fed and mean and hyb and fed["nrmse_mean"] > mean["nrmse_mean"]:
        med, widest = bounds_span_sd()
        print(f"at ε=1 the noised bank alone is worse than the column mean "
              f"({fed['nrmse_mean']:.3f} vs {mean['nrmse_mean']:.3f}): the noise is scaled "
              f"to the public bounds,\nwhich span {med:.0f} standard deviations of an attribute "
              f"here (median; up to {widest:.0f}), and a hospital has {min(rows.values())}-"
              f"{max(rows.values())} patients;\nhybrid, which also uses the hospital's own "
              f"records, gets {hyb['nrmse_mean']:.3f}")
    if loc and hyb:
        print(f"smallest hospital {small} ({rows[small]} patients): local "
              f"{loc['nrmse_site'][small]['mean']:.3f} -> hybrid at ε=1 "
              f"{hyb['nrmse_site'][small]['mean']:.3f}")
    cached = f", {run.n_cached} reused from {run.cache_dir}" if run.n_cached else ""
    print(f"\nstudy: {run.n_cells} cells in {run.wall_s:.1f} s ({run.n_computed} computed"
          f"{cached})")
    print(f"report: {run.files['report']} (plots: "
          + ", ".join(str(run.files[k].name) for k in ("nrmse", "sites", "privacy")
                      if k in run.files) + ")")
    code = _cli_walkthrough(study, out)
    if code != 0:
        return code
    print("\nnext: fediim study simulations/studies/heart.toml   (four real hospitals; "
          "see simulations/studies/)")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
