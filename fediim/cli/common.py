"""What every ``fediim`` subcommand shares: its parser's format and how it reports."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Registrar", "Subparsers", "add_parser", "check_distinct", "error", "warn"]

Subparsers = Any  # argparse's _SubParsersAction (a private type)
Registrar = Callable[[Subparsers], None]


def add_parser(
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


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(paths: dict[str, str]) -> str | None:
    """An error message if two of the named paths are the same file, else None."""
    items = list(paths.items())
    for i, (role_a, a) in enumerate(items):
        for role_b, b in items[i + 1:]:
            if _same_file(a, b):
                return f"{role_a} and {role_b} are the same file ({a}); expected different paths"
    return None
