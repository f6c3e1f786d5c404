"""The ``fediim`` command line.

Every subcommand is a pair of functions: ``_register_<name>(subparsers)`` builds its parser
and sets ``func`` to ``_run_<name>(args) -> int``. All of them are listed once, in
:data:`SUBCOMMANDS`; to add one, write the pair and append the register function there.

Exit codes: :class:`fediim.errors.ExitCode` (the message on stderr names the file, row
and column).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fediim._version import __version__
from fediim.cli.common import Registrar, error
from fediim.cli.deploy import register_local_deploy, register_simulate
from fediim.cli.impute import IIM_PARAGRAPH, register_impute
from fediim.cli.ledger import register_ledger
from fediim.cli.schema import register_schema
from fediim.cli.serve import register_serve
from fediim.cli.study import register_study
from fediim.errors import ExitCode

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# -- the parser -------------------------------------------------------------------------

#: Every subcommand, registered in this order (also the order shown by ``fediim --help``).
SUBCOMMANDS: tuple[Registrar, ...] = (
    register_impute,
    register_serve,
    register_schema,
    register_local_deploy,
    register_simulate,
    register_study,
    register_ledger,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``fediim`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fediim",
        description=f"""\
fediim fills gaps in numeric tables (for example patient records) with IIM, Imputation
via Individual Models, and can do so across several hospitals without any record
leaving its site, under a differential-privacy guarantee.

{IIM_PARAGRAPH}""",
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
        return code if isinstance(code, int) else (ExitCode.OK if code is None else ExitCode.USAGE)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        error("expected a command, e.g. 'fediim impute IN.csv -o OUT.csv'")
        return ExitCode.USAGE
    try:
        return func(args)
    except KeyboardInterrupt:
        error("interrupted")
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
