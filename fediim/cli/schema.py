"""``fediim schema infer``: propose a schema (with a warning: bounds from data are not private)."""

from __future__ import annotations

import argparse
import sys
import warnings

from fediim.cli.argtypes import nonnegative_float
from fediim.cli.common import Subparsers, add_parser, check_distinct, error, warn
from fediim.errors import ExitCode
from fediim.io.atomic import atomic_write_text
from fediim.io.schema import DEFAULT_MISSING, SchemaError, TableSchema, infer_schema
from fediim.io.table import DataError, read_csv

__all__ = ["register_schema"]

_MARKERS_TEXT = ", ".join(repr(m) for m in DEFAULT_MISSING)

def register_schema(sub: Subparsers) -> None:
    p = add_parser(
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
    infer = add_parser(
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
    error("expected an action, e.g. 'infer'")
    return ExitCode.USAGE


def _run_schema_infer(args: argparse.Namespace) -> int:
    clash = check_distinct({"DATA": args.data, "-o": args.output})
    if clash:
        error(clash)
        return ExitCode.USAGE
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
        error(str(exc))
        return ExitCode.USAGE
    for w in caught:
        warn(str(w.message))
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
        error(f"cannot write {args.output}: {exc}")
        return ExitCode.FAILED
    print(f"fediim schema infer: {table.n_cols} columns -> {args.output}", file=sys.stderr)
    return ExitCode.OK
