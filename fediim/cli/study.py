"""``fediim study``: run a privacy–utility study declared in TOML.

Registered in ``fediim.cli.SUBCOMMANDS``; the heavy imports happen only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fediim.cli.argtypes import positive_int

__all__ = ["register_study"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_DESCRIPTION = """\
Run a privacy-utility study: for every dataset x seed x privacy budget (epsilon) x method
of STUDY.toml, split the data into sites, hide some known cells, fill them in, and score
the error (NRMSE: 0 is perfect, about 1 is as bad as the column mean). Writes, under
--out:

  report.md              what was run, the results table, plots, privacy spent per site
  results.json / .csv    every cell (per seed and per site) and the summary
  nrmse_vs_epsilon.png   error against each site's epsilon, per method, seed spread
  per_site.png           error at each site
  privacy_spent.png      epsilon each site spent against its budget
  cache/                 one small JSON file per finished cell

Every finished cell is cached at once, keyed by a hash of its full configuration and of
the code that computes it: rerun the same command after an interruption (or after adding
seeds, budgets or methods) and only the missing cells are computed. Relative paths in the
study file are taken from its project root (the nearest folder above it holding a
pyproject.toml), or from [study] base_dir.

Study files: simulations/studies/*.toml (heart, ccpp, wine, diabetes); every key is
described in simulations/studies/README.md."""

_EPILOG = """\
examples:
  fediim study simulations/studies/diabetes.toml
  fediim study simulations/studies/heart.toml --out study-output/heart --workers 2

exit codes: 0 every cell computed, 1 some cell failed or an output could not be written
(the report lists the failures; rerun to retry them), 2 bad study file or data
(the message names the key), 130 interrupted (finished cells are kept; rerun to resume)"""


def register_study(sub: Any) -> None:
    """Add the ``study`` subcommand to ``fediim``'s subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "study", help="run a privacy-utility study (TOML) and write a report",
        description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", metavar="STUDY.toml", help="the study file")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: study-output/<study name>)")
    p.add_argument("--workers", type=positive_int, default=2, metavar="N",
                   help="processes computing cells in parallel (default: 2)")
    p.add_argument("--cache", metavar="DIR", help="cell cache folder (default: DIR/cache)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (one line per finished task is printed instead "
                        "when stderr is not a terminal)")
    p.set_defaults(func=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    from simulations.config import StudyConfigError, load_study
    from simulations.runner import run_study

    def err(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr)

    try:
        study = load_study(args.study)
    except StudyConfigError as exc:
        err(str(exc))
        return EXIT_USAGE
    out = args.out or f"study-output/{study.name}"
    try:
        run = run_study(study, out, workers=args.workers, cache_dir=args.cache,
                        progress=not args.no_progress)
    except StudyConfigError as exc:
        err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        err(f"interrupted; finished cells are cached under {args.cache or out + '/cache'}: "
            "rerun the same command to resume")
        return 130
    except OSError as exc:
        err(f"cannot write the outputs: {exc}")
        return EXIT_FAILED
    print(f"fediim study {study.name}: {run.n_cells} cells ({run.n_computed} computed, "
          f"{run.n_cached} from cache) in {run.wall_s:.1f} s -> {run.files.get('report')}",
          file=sys.stderr)
    if run.failures:
        n = sum(len(f["methods"]) for f in run.failures)
        err(f"{n} cell(s) failed; see the report. First: {run.failures[0]['task']}: "
            f"{run.failures[0]['error'].splitlines()[0]}")
        return EXIT_FAILED
    return EXIT_OK
