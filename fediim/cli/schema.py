"""``fediim schema infer``: propose a schema (with a warning: bounds from data are not private)."""

from __future__ import annotations

import argparse
import sys
import warnings

from fediim.cli.argtypes import nonnegative_float
from fediim.cli.common import Subparsers, add_parser, check_distinct, error, warn
from fediim.errors import ExitCode
from fediim.io.atomic import atomic_write_text
from fediim.io.schema import (
    DEFAULT_MISSING,
    SchemaError,
    TableSchema,
    infer_schema,
    propose_kinds,
)
from fediim.io.table import DataError, Table, read_cells, read_csv

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
Write a schema for DATA.csv: one column per header field, with a proposed kind. A column
holding text, or at most 10 distinct whole numbers, is proposed as categorical (binary with
two) over the labels it holds; every other column is numeric, with bounds equal to the
smallest and largest observed value (widened by --margin).

Levels read from the data list only the labels that occur (a rare level may be absent, and
its presence is itself information): confirm each proposed kind, and write the full public
list of levels, before any federated run. A warning names each proposed column.

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


def _infer(args: argparse.Namespace
           ) -> tuple[Table, TableSchema, dict[str, tuple[str, tuple[str | float, ...]]]]:
    """The table, the proposed schema, and the columns proposed as coded."""
    names, cells = read_cells(args.data, missing_markers=args.missing)
    proposed = propose_kinds(names, cells)
    coded = TableSchema.model_validate({"columns": [
        {"name": name, **({"kind": proposed[name][0], "levels": proposed[name][1]}
                          if name in proposed else {})} for name in names]})
    table = read_csv(args.data, schema=coded, missing_markers=args.missing)
    numeric = [j for j, name in enumerate(names) if name not in proposed]
    specs = {name: coded.column(name).model_dump() for name in proposed}
    if numeric:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bounded = infer_schema(table.values[:, numeric], [names[j] for j in numeric],
                                   margin=args.margin)
        for w in caught:
            warn(str(w.message))
        specs.update({c.name: c.model_dump() for c in bounded.columns})
    missing = (list(dict.fromkeys(args.missing)) if args.missing is not None
               else list(DEFAULT_MISSING))
    schema = TableSchema.model_validate({"columns": [specs[name] for name in names],
                                         "missing": missing})
    return table, schema, proposed


def _run_schema_infer(args: argparse.Namespace) -> int:
    clash = check_distinct({"DATA": args.data, "-o": args.output})
    if clash:
        error(clash)
        return ExitCode.USAGE
    try:
        table, schema, proposed = _infer(args)
    except (DataError, SchemaError) as exc:
        error(str(exc))
        return ExitCode.USAGE
    for name, (kind, levels) in proposed.items():
        warn(f"column {name!r} looks {kind} (levels {list(levels)} as read from "
             f"{table.source}); confirm the kind and declare the full public list of levels "
             "before any federated run")
    header = (
        "# fediim table schema, inferred from data by 'fediim schema infer'.\n"
        f"# WARNING: the bounds and levels below were read from {table.source}; bounds\n"
        "# reveal its extremes, levels which labels occur. Replace them with public\n"
        "# domain knowledge (and confirm each proposed kind) before any federated run.\n"
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
