"""The ``fediim`` command line.

Every subcommand is a pair of functions: ``_register_<name>(subparsers)`` builds its parser
and sets ``func`` to ``_run_<name>(args) -> int``. All of them are listed once, in
:data:`SUBCOMMANDS`; to add one, write the pair and append the register function there.

Exit codes: 0 success, 1 an output could not be written, 2 bad usage or bad input
(the message on stderr names the file, row and column).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from fediim import __version__
from fediim.argtypes import nonnegative_float, positive_int
from fediim.atomic import atomic_open, atomic_write_text
from fediim.audit import audit_records, dump_audit_jsonl
from fediim.data import DataError, read_csv
from fediim.deploy import register_local_deploy, register_simulate
from fediim.imputer import IIMImputer
from fediim.outputs import apply_schema, write_flags, write_table
from fediim.schema import DEFAULT_MISSING, SchemaError, TableSchema, infer_schema, load_schema
from simulations.cli import register_study

__all__ = ["SUBCOMMANDS", "build_parser", "default_sidecar_paths", "main"]

EXIT_OK = 0
EXIT_WRITE = 1
EXIT_USAGE = 2

Subparsers = Any  # argparse's _SubParsersAction (a private type)
Registrar = Callable[[Subparsers], None]

_IIM_PARAGRAPH = """\
IIM (Imputation via Individual Models) fills a missing cell from the rows that are most
like it. Each complete row gets its own small regression model, learned on its nearest
neighbours (how many is chosen per row by validation: from 1, which copies the neighbour's
value as kNN imputation does, up to all rows, which is ordinary linear regression). To
fill a cell, the k nearest complete rows (compared on the attributes the incomplete row
does have) each predict the value with their model, and the predictions are combined by
a vote that favours candidates agreeing with the others. Their spread is reported as
the cell's uncertainty."""

_MARKERS_TEXT = ", ".join(repr(m) for m in DEFAULT_MISSING)


def _add_parser(
    sub: Subparsers, name: str, *, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatting (paragraphs kept as written)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _check_distinct(paths: dict[str, str]) -> str | None:
    """An error message if two of the named paths are the same file, else None."""
    items = list(paths.items())
    for i, (role_a, a) in enumerate(items):
        for role_b, b in items[i + 1:]:
            if _same_file(a, b):
                return f"{role_a} and {role_b} are the same file ({a}); expected different paths"
    return None


# -- impute -----------------------------------------------------------------------------


def default_sidecar_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Default flags and audit paths next to ``out``: ``X.csv`` -> ``X.flags.csv``,
    ``X.audit.jsonl``."""
    p = Path(out)
    base = p.with_suffix("") if p.suffix.lower() == ".csv" else p
    return base.with_name(base.name + ".flags.csv"), base.with_name(base.name + ".audit.jsonl")


def _register_impute(sub: Subparsers) -> None:
    p = _add_parser(
        sub,
        "impute",
        help="fill the missing cells of a CSV table with IIM",
        description=f"""\
Fill the missing cells of a numeric CSV table (header row required) with IIM and write
the completed table, a per-cell flag/uncertainty table and an audit log.

{_IIM_PARAGRAPH}

Observed cells are written back unchanged (same value, shortest exact form); columns
keep their names and order. A cell is missing if it is one of the missing markers
(default: {_MARKERS_TEXT}; '' is an empty field).
Any other non-number is an error naming the file, line and column, and then nothing is
written.

Outputs (each written atomically; the table is written last, so if it exists the
others are complete too):
  OUT                 the imputed table
  OUT.flags.csv       per row, for every column <col>: <col>_imputed (1 if filled in,
                      else 0) and <col>_uncertainty (spread of the candidates; empty if
                      the cell was observed)
  OUT.audit.jsonl     one JSON line per imputed cell: row (1 = first data row), column,
                      method, k, ell, n_candidates, uncertainty, value
(for OUT = X.csv the side files are X.flags.csv and X.audit.jsonl)""",
        epilog="""\
examples:
  fediim impute visits.csv -o visits_imputed.csv
  fediim impute visits.csv -o out.csv --schema schema.toml --k 15
  fediim impute raw.csv -o out.csv --missing NA --missing -999 --no-scale

With --schema, the header must match the schema's columns, its missing markers apply,
columns with impute = false are left with their gaps, and imputed values are clipped
into the column bounds. Make a starting schema with: fediim schema infer""",
    )
    p.add_argument("input", metavar="IN.csv", help="table with missing cells")
    p.add_argument("-o", "--output", metavar="OUT.csv", required=True,
                   help="where to write the imputed table")
    p.add_argument("--schema", metavar="SCHEMA.toml",
                   help="table schema (columns, bounds, missing markers, what to impute)")
    p.add_argument("--k", type=positive_int, default=10, metavar="K",
                   help="number of neighbours whose models vote on each cell (default: 10)")
    p.add_argument("--scale", action=argparse.BooleanOptionalAction, default=True,
                   help="z-score the columns before comparing rows (default: --scale); "
                        "--no-scale uses raw distances")
    p.add_argument("--flags", metavar="FLAGS.csv",
                   help="path of the flag/uncertainty table (default: OUT.flags.csv)")
    p.add_argument("--audit", metavar="AUDIT.jsonl",
                   help="path of the audit log (default: OUT.audit.jsonl)")
    p.add_argument("--missing", metavar="MARKER", nargs="+", action="extend",
                   help="text meaning 'missing' (repeatable); replaces the default markers "
                        "and the schema's global ones, e.g. --missing NA --missing ''")
    p.set_defaults(func=_run_impute)


def _count_out_of_bounds(values: np.ndarray, schema: TableSchema, columns: list[str]) -> int:
    total = 0
    for j, name in enumerate(columns):
        bounds = schema.column(name).bounds
        if bounds is not None:
            col = values[:, j]
            total += int(((col < bounds[0]) | (col > bounds[1])).sum())
    return total


def _run_impute(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = args.output
    flags_default, audit_default = default_sidecar_paths(out)
    flags = args.flags or str(flags_default)
    audit = args.audit or str(audit_default)
    clash = _check_distinct({"IN": args.input, "OUT": out, "--flags": flags, "--audit": audit})
    if clash:
        _error(clash)
        return EXIT_USAGE

    try:
        schema = load_schema(args.schema) if args.schema else None
        table = read_csv(args.input, schema=schema, missing_markers=args.missing)
    except (DataError, SchemaError) as exc:
        _error(str(exc))
        return EXIT_USAGE

    columns = table.columns
    if schema is not None:
        outside = _count_out_of_bounds(table.values, schema, columns)
        if outside:
            _warn(f"{outside} observed cell(s) of {table.source} lie outside the schema bounds "
                  f"(written back unchanged)")

    imputer = IIMImputer(n_neighbors=args.k, scale=args.scale)
    try:
        result = imputer.fit(table.values).impute(table.values)
    except ValueError as exc:
        _error(f"{table.source}: cannot impute: {exc}")
        return EXIT_USAGE
    if schema is not None:
        apply_schema(result, schema, columns)
    if not np.isfinite(result.values[result.imputed]).all():  # pragma: no cover - defensive
        _error(f"{table.source}: imputation produced a non-finite value; nothing was written")
        return EXIT_WRITE

    # All three files are staged as temporary files and only then renamed into place, the
    # table last: a failure anywhere leaves none of them half-written, and a table on disk
    # means its flags and audit are there too.
    try:
        with ExitStack() as stack:
            fh_table = stack.enter_context(atomic_open(out, "w", newline=""))
            fh_audit = stack.enter_context(atomic_open(audit, "w", newline=""))
            fh_flags = stack.enter_context(atomic_open(flags, "w", newline=""))
            write_flags(fh_flags, result, columns)
            n_cells = dump_audit_jsonl(fh_audit, audit_records(result, columns, k=args.k))
            write_table(fh_table, result.values, columns)
    except OSError as exc:
        _error(f"cannot write the outputs ({exc}); nothing was written")
        return EXIT_WRITE

    seconds = time.perf_counter() - start
    print(
        f"fediim impute: {table.n_rows} rows x {table.n_cols} columns, {n_cells} cells imputed "
        f"in {seconds:.2f} s -> {out} (flags: {flags}, audit: {audit})",
        file=sys.stderr,
    )
    return EXIT_OK


# -- schema -----------------------------------------------------------------------------


def _register_schema(sub: Subparsers) -> None:
    p = _add_parser(
        sub,
        "schema",
        help="work with table schemas (column bounds, missing markers)",
        description="""\
A schema is a small TOML file describing a table: its columns in order, public bounds for
each column (domain knowledge such as age 0-120, not read from the data), the markers
that mean "missing", and which columns may be imputed. Federated runs scale every
release into these bounds, so they must not reveal anything about the records.""",
        epilog="""\
examples:
  fediim schema infer visits.csv -o schema.toml
  fediim impute visits.csv -o out.csv --schema schema.toml""",
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    infer = _add_parser(
        actions,
        "infer",
        help="write a starting schema with bounds taken from a data file",
        description="""\
Write a schema for DATA.csv: one numeric column per header field, with bounds equal to
the smallest and largest observed value (widened by --margin).

Bounds read from the data reveal its extremes (for example the oldest patient's age), so
they are NOT differentially private: edit the file and replace them with public
domain-knowledge bounds before using it in any federated run. A warning says so.""",
        epilog="""\
examples:
  fediim schema infer visits.csv -o schema.toml
  fediim schema infer visits.csv -o schema.toml --margin 0.1 --missing NA""",
    )
    infer.add_argument("data", metavar="DATA.csv", help="table to read the bounds from")
    infer.add_argument("-o", "--output", metavar="SCHEMA.toml", required=True,
                       help="where to write the schema")
    infer.add_argument("--margin", type=nonnegative_float, default=0.0, metavar="FRACTION",
                       help="widen each range by this fraction of its width on both sides "
                            "(default: 0)")
    infer.add_argument("--missing", metavar="MARKER", nargs="+", action="extend",
                       help="text meaning 'missing' (repeatable); also recorded in the "
                            f"schema (default: {_MARKERS_TEXT})")
    infer.set_defaults(func=_run_schema_infer)
    p.set_defaults(func=lambda _args: _missing_action(p))


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    _error("expected an action, e.g. 'infer'")
    return EXIT_USAGE


def _run_schema_infer(args: argparse.Namespace) -> int:
    clash = _check_distinct({"DATA": args.data, "-o": args.output})
    if clash:
        _error(clash)
        return EXIT_USAGE
    try:
        table = read_csv(args.data, missing_markers=args.missing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schema = infer_schema(table.values, table.columns, margin=args.margin)
        if args.missing is not None:
            schema = TableSchema.model_validate(
                {**schema.model_dump(), "missing": list(dict.fromkeys(args.missing))}
            )
    except (DataError, SchemaError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    for w in caught:
        _warn(str(w.message))
    header = (
        "# fediim table schema, inferred from data by 'fediim schema infer'.\n"
        f"# WARNING: the bounds below were read from {table.source} and reveal its extremes.\n"
        "# Replace them with public domain-knowledge bounds before any federated run.\n"
    )
    body = schema.to_toml()
    if body.startswith("#"):  # to_toml's own header claims the bounds are not from data
        body = body.split("\n", 1)[1]
    try:
        atomic_write_text(args.output, header + body)
    except OSError as exc:
        _error(f"cannot write {args.output}: {exc}")
        return EXIT_WRITE
    print(f"fediim schema infer: {table.n_cols} columns -> {args.output}", file=sys.stderr)
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------

#: Every subcommand, registered in this order (also the order shown by ``fediim --help``).
SUBCOMMANDS: tuple[Registrar, ...] = (
    _register_impute,
    _register_schema,
    register_local_deploy,
    register_simulate,
    register_study,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``fediim`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fediim",
        description=f"""\
fediim fills gaps in numeric tables (for example patient records) with IIM, Imputation
via Individual Models, and can do so across several hospitals without any record
leaving its site, under a differential-privacy guarantee.

{_IIM_PARAGRAPH}""",
        epilog="""\
examples:
  fediim impute visits.csv -o visits_imputed.csv
  fediim schema infer visits.csv -o schema.toml
  fediim impute --help

exit codes: 0 success, 1 an output could not be written, 2 bad usage or bad input""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fediim {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fediim`` command line on ``argv`` (default ``sys.argv[1:]``); return the
    exit code (``--help`` and ``--version`` return 0, usage errors 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        _error("expected a command, e.g. 'fediim impute IN.csv -o OUT.csv'")
        return EXIT_USAGE
    try:
        return func(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
