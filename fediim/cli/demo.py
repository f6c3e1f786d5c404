"""The ``make demo`` job: a four-hospital privacy–utility study, then the CLI on one table.

Run as ``python -m fediim.cli.demo``. It runs the study ``simulations/studies/diabetes.toml``
(read from the installed ``simulations`` package) on scikit-learn's bundled diabetes data
(442 patients x 10 attributes; no download):

- ``sex`` is declared binary with levels 1 and 2: every method imputes one of them;
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
runs ``fediim impute`` on hospital D's masked table (with a schema declaring ``sex``) to
show the files a user gets.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fediim.cli.command import main as cli_main
from fediim.cli.impute import default_sidecar_paths
from fediim.io.table import write_csv

__all__ = ["demo_study", "demo_study_path", "main"]


def demo_study_path() -> Path:
    """``simulations/studies/diabetes.toml``, found through the installed ``simulations``
    package (the studies ship as its package data)."""
    from importlib.resources import files

    return Path(str(files("simulations").joinpath("studies", "diabetes.toml")))


def demo_study(seeds: Sequence[int] | None = None) -> Any:
    """The demo's study, read from :func:`demo_study_path` (optionally with other seeds,
    e.g. for a quick test)."""
    from simulations.config import load_study

    study = load_study(demo_study_path())
    return study if seeds is None else study.replace(seeds=list(seeds))


def bounds_span_sd() -> tuple[float, float]:
    """Median and widest public bound, in standard deviations of the attribute.

    The Gaussian noise is calibrated to the public bounds, not to the data's spread, so
    this ratio says how loud a given budget is on this data.
    """
    import numpy as np
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    bounds = demo_study().config.bounds
    b = np.array([bounds[c] for c in d.feature_names], dtype=np.float64)
    span = (b[:, 1] - b[:, 0]) / d.data.std(axis=0)
    return float(np.median(span)), float(span.max())


def _privacy_table(summary: dict[str, Any], study: Any, rows: dict[str, int]) -> str:
    from simulations.config import eps_key
    from simulations.tables import aligned_table, eps_label

    cells = summary["diabetes"][study.private_methods[0]]
    keys = [eps_key(e) or "" for e in study.config.study.epsilons]
    head = ["site", "patients"] + [f"ε={eps_label(k)}" for k in keys]
    body = []
    for site, n in rows.items():
        row = [site, str(n)]
        for k in keys:
            p = (cells.get(k, {}).get("privacy_site") or {}).get(site)
            row.append("none (no noise)" if k == "inf" else
                       "" if p is None else f"{p['epsilon_spent']:.2f} of {k}")
        body.append(row)
    return _indented(aligned_table(head, body))


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _walkthrough_schema(study: Any, columns: Sequence[str]) -> str:
    """The schema of the walkthrough's table: the study's public bounds, and its coded
    columns (``sex``) with their declared levels, so that a gap gets one of the levels."""
    from fediim.io.schema import TableSchema

    levels = study.config.datasets[0].levels
    specs = [{"name": name, "kind": levels[name].kind, "levels": list(levels[name].levels)}
             if name in levels else {"name": name, "bounds": study.config.bounds[name]}
             for name in columns]
    return TableSchema.model_validate({"columns": specs}).to_toml()


def _cli_walkthrough(study: Any, out: Path) -> int:
    """``fediim impute`` on hospital D's masked table (seed 0)."""
    from simulations.methods import prepare

    p = prepare(study, 0, study.config.study.seeds[0])
    site = p.fed.site_names[-1]
    x = p.masked[-1]
    src = out / f"hospital_{site}_masked.csv"
    dst = out / f"hospital_{site}_imputed.csv"
    write_csv(src, x, p.fed.columns, float_format=None)
    schema = out / "schema.toml"
    schema.write_text(_walkthrough_schema(study, p.fed.columns), encoding="utf-8")
    argv = ["impute", str(src), "-o", str(dst), "--schema", str(schema)]
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
                       (flags, "per cell: imputed (0/1), uncertainty; sex's probability"),
                       (audit, "one JSON line per imputed cell: method, k, candidates")):
        print(f"  {str(path):<44}  {what}")
    return 0


def _print_intro(seeds: Sequence[int]) -> None:
    print("fediim demo: four hospitals fill gaps in their records, alone or together under "
          "differential privacy")
    print("  data: scikit-learn's diabetes table, 442 patients x 10 attributes (age, sex, "
          "bmi, bp, s1-s6);\n  sex is declared binary (levels 1, 2): it is imputed as a level")
    print("  hospitals A, B, C, D hold 40/30/20/10% of the patients; in 20% of each one's "
          "complete records")
    print(f"  one random attribute is hidden (seeds {', '.join(map(str, seeds))}); "
          "budgets ε = 1, 4, ∞ per hospital, δ = 1e-6\n")
    sys.stdout.flush()


def _print_results(summary: dict[str, Any], study: Any, rows: dict[str, int]) -> None:
    """The method x epsilon table and each hospital's privacy spent."""
    from simulations.tables import table_text

    print(f"NRMSE, mean ± sd over {len(study.config.study.seeds)} seed(s) (lower is better; "
          "0 = perfect, ~1 = as bad as the column mean):\n")
    print(_indented(table_text(summary, study, "diabetes", markdown=False)))
    print("\n  local: each hospital alone, nothing shared · federated: the private model bank "
          "only ·\n  hybrid: bank + the hospital's own model · centralized / knn / mean: all "
          "records pooled (NOT private)")
    print("\nprivacy spent per hospital (ε of its budget; `local` spends nothing):\n")
    print(_privacy_table(summary, study, rows))


def _print_observations(summary: dict[str, Any], records: Sequence[dict[str, Any]],
                        rows: dict[str, int]) -> None:
    """What the numbers say at ε = 1: the bank alone against the column mean, and what
    joining gains each hospital (hybrid against alone, paired by seed)."""
    from simulations.summary import site_gains

    res = summary["diabetes"]
    mean, fed = res.get("mean", {}).get("-"), res.get("federated", {}).get("1")
    print()
    if fed and mean:
        better = fed["nrmse_mean"] < mean["nrmse_mean"]
        change = 100 * (fed["nrmse_mean"] / mean["nrmse_mean"] - 1)
        print(f"at ε=1 the private bank alone is {'better' if better else 'worse'} than the "
              f"column mean of all records pooled ({fed['nrmse_mean']:.3f} vs "
              f"{mean['nrmse_mean']:.3f}, {change:+.1f}%)")
        if not better:
            med, widest = bounds_span_sd()
            print(f"  (the noise is scaled to the public bounds, which span {med:.0f} "
                  f"standard deviations of an attribute here; up to {widest:.0f})")
    gains = site_gains(records, "1").get("diabetes", {})
    if gains:
        print("\nwhat joining gains each hospital at ε=1 (NRMSE alone -> in the federation, "
              "paired by seed):")
        for site, g in gains.items():
            print(f"  {site} ({rows[site]:>3} patients): {g['local']:.3f} -> {g['joined']:.3f}"
                  f"  ({g['mean']:+.3f} ± {g['se']:.3f}, "
                  f"{100 * g['mean'] / g['local']:+.1f}%)")


def main(out_dir: str | os.PathLike[str] = "demo-output", *,
         seeds: Sequence[int] | None = None, workers: int = 2,
         progress: bool | None = None) -> int:
    """Run the demo, writing under ``out_dir``; return 0 on success."""
    from simulations.runner import run_study
    from simulations.summary import summarise

    study = demo_study(seeds)
    out = Path(out_dir)
    t0 = time.perf_counter()
    _print_intro(study.config.study.seeds)
    run = run_study(study, out, workers=workers,
                    progress=sys.stderr.isatty() if progress is None else progress,
                    log=lambda _msg: None)
    if run.failures:
        for f in run.failures:
            print(f"error: {f['task']}: {f['error']}", file=sys.stderr)
        return 1
    summary = summarise(run.records)
    rows = run.records[0]["n_rows_site"]
    _print_results(summary, study, rows)
    _print_observations(summary, run.records, rows)
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
