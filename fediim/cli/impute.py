"""``fediim impute``: fill a CSV table's missing cells with IIM; all outputs or none."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from fediim.cli.argtypes import positive_int
from fediim.cli.common import Subparsers, add_parser, check_distinct, error, warn
from fediim.errors import ExitCode, FediimError
from fediim.federated.plan import MODES
from fediim.impute.estimator import IIMImputer, ImputationResult
from fediim.io.atomic import atomic_outputs
from fediim.io.audit import audit_records, dump_audit_jsonl
from fediim.io.outputs import apply_schema, write_flags, write_table
from fediim.io.result import METHOD_FALLBACK
from fediim.io.schema import DEFAULT_MISSING, TableSchema, load_schema
from fediim.io.table import Table, read_csv
from fediim.serve.site import Site, count_methods, fallback_rate

__all__ = ["default_sidecar_paths", "multiple_paths", "register_impute"]

IIM_PARAGRAPH = """\
IIM (Imputation via Individual Models) fills a missing cell from the rows that are most
like it. Each complete row gets its own small regression model, learned on its nearest
neighbours (how many is chosen per row by validation: from 1, which copies the neighbour's
value as kNN imputation does, up to all rows, which is ordinary linear regression). To
fill a cell, the k nearest complete rows (compared on the attributes the incomplete row
does have) each predict the value with their model, and the predictions are combined by
a vote that favours candidates agreeing with the others. Their spread is reported as
the cell's uncertainty."""

_MARKERS_TEXT = ", ".join(repr(m) for m in DEFAULT_MISSING)

def default_sidecar_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Default flags and audit paths next to ``out``: ``X.csv`` -> ``X.flags.csv``,
    ``X.audit.jsonl``."""
    p = Path(out)
    base = p.with_suffix("") if p.suffix.lower() == ".csv" else p
    return base.with_name(base.name + ".flags.csv"), base.with_name(base.name + ".audit.jsonl")


def multiple_paths(out: str | os.PathLike[str], n_imputations: int) -> list[Path]:
    """Paths of the M drawn tables next to ``out``: ``X.csv`` -> ``X.imp1.csv`` ...
    ``X.impM.csv``."""
    p = Path(out)
    base = p.with_suffix("") if p.suffix.lower() == ".csv" else p
    return [base.with_name(f"{base.name}.imp{number}.csv")
            for number in range(1, n_imputations + 1)]


def at_least_two(text: str) -> int:
    """M for --multiple: an integer >= 2 (pooling needs at least two tables)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (pooling needs at "
                                         f"least two tables), got {value}")
    return value


#: ``fediim impute --help``: what it does and writes (the description) ...
IMPUTE_DESCRIPTION = f"""\
Fill the missing cells of a numeric CSV table (header row required) with IIM and write
the completed table, a per-cell flag/uncertainty table and an audit log.

{IIM_PARAGRAPH}

Observed cells are written back unchanged (same value, shortest exact form); columns
keep their names and order. A cell is missing if it is one of the missing markers
(default: {_MARKERS_TEXT}; '' is an empty field).
Any other non-number is an error naming the file, line and column, and then nothing is
written.

Outputs (committed together: all three are written, or none is and any previous
versions stay as they were):
  OUT                 the imputed table
  OUT.flags.csv       per row, for every column <col>: <col>_imputed (1 if filled in,
                      else 0), <col>_uncertainty (spread of the candidates) and
                      <col>_method (iim, hybrid, bank, mean or fallback); the last two
                      empty if the cell was observed
  OUT.audit.jsonl     one JSON line per imputed cell: row (1 = first data row), column,
                      method, k, ell, n_candidates, uncertainty, value
  OUT.impN.csv        with --multiple M: the N-th of M completed tables (N = 1..M),
                      each drawn from the predictive distribution (a candidate drawn
                      by its vote weight plus the models' residual noise, the models
                      learned on a random half of the rows; a coded column's level
                      drawn from its level probabilities, written as its label);
                      observed cells as in IN. With --site-config each table is
                      drawn from the bank re-noised at the scale it was released
                      with, plus the residual noise measured on the site's own rows
                      (no budget spent). Analyse each and pool with Rubin's rules
                      (fediim.mi.pool). A drawn table holds values only:
                      OUT.flags.csv and OUT.audit.jsonl describe the single
                      imputation (a coded cell's most probable level and its
                      probability), not a draw, whose level may be a less probable
                      one; the cells filled in are the same in every table
                      (<col>_imputed).
(for OUT = X.csv the side files are X.flags.csv, X.audit.jsonl and X.imp1.csv ...)"""

#: ... and how it is used, with a schema and with a site's bank (the epilog).
IMPUTE_EPILOG = """\
examples:
  fediim impute visits.csv -o visits_imputed.csv
  fediim impute visits.csv -o out.csv --schema schema.toml --k 15
  fediim impute raw.csv -o out.csv --missing NA --missing -999 --no-scale
  fediim impute new_visits.csv -o out.csv --site-config site.toml --mode hybrid

With --schema, the header must match the schema's columns, its missing markers apply,
columns with impute = false are left with their gaps, and imputed values are clipped
into the column bounds. A column the schema declares binary, categorical or ordinal
(with its levels) holds labels (numbers or text): each gap gets one of the declared
levels, and OUT.flags.csv adds <col>_probability (the level's voted probability; its
uncertainty is 1 - probability) for binary and categorical columns.
Make a starting schema with: fediim schema infer

With --site-config, a site that took part in a federation run imputes from the bank the
run left in its output_dir (bank.npz, bank.sig.json; the TOML keys bank, bank_signature
override): the bank's signature must verify under the pinned coordinator key for the
site's schema, and the bank be at most max_bank_age_days old, or nothing is written. The
site's own rows (its data file) are the local side and the validation rows of every
choice (mode hybrid blends them with the bank; --mode, else [serve] mode, else hybrid):
each row of IN is imputed as fediim serve would impute it. A cell the bank cannot impute
(its row observes nothing, or the bank's models fail) gets the site's mean, else the
bank's, marked fallback; the summary line states the fallback rate. The site's schema
applies; no budget is spent (the privacy ledger is not touched)."""


def register_impute(sub: Subparsers) -> None:
    """Add ``fediim impute`` to ``sub``."""
    p = add_parser(sub, "impute", help="fill the missing cells of a CSV table with IIM",
                   description=IMPUTE_DESCRIPTION, epilog=IMPUTE_EPILOG)
    p.add_argument("input", metavar="IN.csv", help="table with missing cells")
    p.add_argument("-o", "--output", metavar="OUT.csv", required=True,
                   help="where to write the imputed table")
    p.add_argument("--schema", metavar="SCHEMA.toml",
                   help="table schema (columns, bounds, missing markers, what to impute)")
    _add_engine_arguments(p)
    _add_side_file_arguments(p)
    _add_multiple_arguments(p)
    p.add_argument("--site-config", metavar="SITE.toml",
                   help="impute from this site's signed federation bank (see below)")
    p.add_argument("--mode", choices=MODES,
                   help="with --site-config: how the bank is used (default: hybrid)")
    p.set_defaults(func=_run_impute)


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--k and --scale: how many neighbours vote, and whether distances are z-scored."""
    p.add_argument("--k", type=positive_int, default=10, metavar="K",
                   help="number of neighbours whose models vote on each cell (default: 10)")
    p.add_argument("--scale", action=argparse.BooleanOptionalAction, default=True,
                   help="z-score the columns before comparing rows (default: --scale); "
                        "--no-scale uses raw distances")


def _add_side_file_arguments(p: argparse.ArgumentParser) -> None:
    """--flags, --audit and --missing: where the side files go, what 'missing' means."""
    p.add_argument("--flags", metavar="FLAGS.csv",
                   help="path of the flag/uncertainty table (default: OUT.flags.csv)")
    p.add_argument("--audit", metavar="AUDIT.jsonl",
                   help="path of the audit log (default: OUT.audit.jsonl)")
    p.add_argument("--missing", metavar="MARKER", nargs="+", action="extend",
                   help="text meaning 'missing' (repeatable); replaces the default markers "
                        "and the schema's global ones, e.g. --missing NA --missing ''")


def _add_multiple_arguments(p: argparse.ArgumentParser) -> None:
    """--multiple M and its --seed."""
    p.add_argument("--multiple", type=at_least_two, metavar="M",
                   help="also write M completed tables drawn for multiple imputation "
                        "(OUT.imp1.csv ... OUT.impM.csv)")
    p.add_argument("--seed", type=int, metavar="SEED",
                   help="with --multiple: seed of the draws (default: fresh entropy)")


def _count_out_of_bounds(values: np.ndarray, schema: TableSchema, columns: list[str]) -> int:
    """Observed cells of ``values`` outside their column's schema bounds."""
    total = 0
    for j, name in enumerate(columns):
        bounds = schema.column(name).bounds
        if bounds is not None:
            col = values[:, j]
            total += int(((col < bounds[0]) | (col > bounds[1])).sum())
    return total


def _option_problem(args: argparse.Namespace) -> str | None:
    """Options that contradict each other, else None."""
    if args.seed is not None and (args.multiple is None or args.seed < 0):
        return "--seed needs --multiple and a value >= 0 (it seeds the draws)"
    if args.site_config is None:
        return "--mode needs --site-config (it says how the site's bank is used)" \
            if args.mode else None
    if args.schema:
        return "--schema with --site-config: the site's own schema applies; drop --schema"
    if not args.scale:
        return "--no-scale with --site-config: imputing from the bank always scales"
    return None


def _read_inputs(args: argparse.Namespace) -> tuple[Table, TableSchema | None, Site | None]:
    """The table, its schema and, with --site-config, the site with its verified bank
    (read before IN: a bank it cannot trust stops everything)."""
    if args.site_config is not None:
        site = Site.open(args.site_config, mode=args.mode, n_neighbors=args.k)
        # A column this hospital never measures is what the federation's bank is for.
        table = read_csv(args.input, schema=site.schema, missing_markers=args.missing,
                         allow_empty_columns=True)
        return table, site.schema, site
    schema = load_schema(args.schema) if args.schema else None
    return read_csv(args.input, schema=schema, missing_markers=args.missing), schema, None


def _imputed(args: argparse.Namespace, table: Table, site: Site | None,
             schema: TableSchema | None) -> tuple[ImputationResult, list[ImputationResult]]:
    """IIM on the table alone, or, with the site's bank, the site's imputation from it
    (prepared on the site's own rows, its ``data``); and the --multiple draws. The
    schema's coded columns hold codes, imputed as levels (see :mod:`fediim.impute.encoding`)."""
    if site is None:
        kinds = schema.code_kinds() if schema is not None else None
        imputer = IIMImputer(n_neighbors=args.k, scale=args.scale, column_kinds=kinds or None,
                             n_imputations=args.multiple or 1, random_state=args.seed)
        imputer.fit(table.values)
        draws = imputer.impute_multiple(table.values) if args.multiple else []
        return imputer.impute(table.values), draws
    draws = site.impute_multiple(table.values, args.multiple, np.random.default_rng(
        args.seed)) if args.multiple else []
    return site.impute(table.values), draws


def _summary(table: Table, result: ImputationResult, site: Site | None, seconds: float,
             n_cells: int, written: str) -> str:
    """The one-line summary: sizes, cells imputed, the bank used, the fallback rate."""
    origin = "" if site is None else (
        f" from the bank of run {site.signed.run_id} (saved {site.signed.saved_at:%Y-%m-%d})")
    counts = count_methods(result)
    return (f"fediim impute: {table.n_rows} rows x {table.n_cols} columns, {n_cells} cells "
            f"imputed{origin}, {counts.get(METHOD_FALLBACK, 0)} by fallback (fallback rate "
            f"{fallback_rate(counts):.2%}) in {seconds:.2f} s -> {written}")


def _write_outputs(args: argparse.Namespace, result: ImputationResult,
                   draws: list[ImputationResult], columns: list[str],
                   paths: tuple[str, str, str, list[Path]], schema: TableSchema | None) -> int:
    """Write the table, flags, audit and the drawn tables (coded columns as their labels),
    staged and committed together: all of them are written or none (a failed commit puts
    back what was there before). Returns the number of imputed cells."""
    out, flags, audit, tables = paths
    levels = None if schema is None else schema.column_levels()
    with atomic_outputs() as outputs:
        with outputs.open(flags, newline="") as fh_flags:
            write_flags(fh_flags, result, columns, schema)
        with outputs.open(audit, newline="") as fh_audit:
            n_cells = dump_audit_jsonl(fh_audit, audit_records(result, columns, k=args.k,
                                                               levels=levels))
        with outputs.open(out, newline="") as fh_table:
            write_table(fh_table, result.values, columns, schema)
        for path, drawn in zip(tables, draws, strict=True):
            with outputs.open(path, newline="") as fh_drawn:
                write_table(fh_drawn, drawn.values, columns, schema)
    return n_cells


def _output_paths(args: argparse.Namespace) -> tuple[str, str, str, list[Path]]:
    """OUT, the flags and audit paths (given, else next to OUT) and the drawn tables'."""
    flags_default, audit_default = default_sidecar_paths(args.output)
    return (args.output, args.flags or str(flags_default), args.audit or str(audit_default),
            multiple_paths(args.output, args.multiple or 0))


def _run_impute(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out, flags, audit, tables = _output_paths(args)
    problem = _option_problem(args) or check_distinct(
        {"IN": args.input, "OUT": out, "--flags": flags, "--audit": audit,
         **{f"imputation {number}": str(path) for number, path in enumerate(tables, 1)}})
    if problem:
        error(problem)
        return ExitCode.USAGE

    try:
        table, schema, site = _read_inputs(args)
    except FediimError as exc:
        error(str(exc))
        return exc.exit_code

    columns = table.columns
    outside = 0 if schema is None else _count_out_of_bounds(table.values, schema, columns)
    if outside:
        warn(f"{outside} observed cell(s) of {table.source} lie outside the schema bounds "
             f"(written back unchanged)")

    try:
        result, draws = _imputed(args, table, site, schema)
    except ValueError as exc:
        error(f"{table.source}: cannot impute: {exc}")
        return ExitCode.USAGE
    if schema is not None:
        for imputed in (result, *draws):
            apply_schema(imputed, schema, columns)
    if not np.isfinite(result.values[result.imputed]).all():  # pragma: no cover - defensive
        error(f"{table.source}: imputation produced a non-finite value; nothing was written")
        return ExitCode.FAILED

    try:
        n_cells = _write_outputs(args, result, draws, columns, (out, flags, audit, tables),
                                 schema)
    except OSError as exc:
        error(f"cannot write the outputs ({exc}); none of them was written")
        return ExitCode.FAILED

    drawn_note = f", {len(tables)} drawn tables: {tables[0]} ..." if tables else ""
    print(_summary(table, result, site, time.perf_counter() - start, n_cells,
                   f"{out} (flags: {flags}, audit: {audit}{drawn_note})"), file=sys.stderr)
    return ExitCode.OK
