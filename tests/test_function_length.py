"""No function of the service or the CLI is over 60 lines (the quality bar): a long help
text lives in a module-level constant, a long handler in named steps."""

from __future__ import annotations

import ast
from pathlib import Path

import fediim

#: The packages held to the bar here (elsewhere site_impute and release_gaussian are not).
CHECKED = ("serve", "cli")
MAX_LINES = 60


def test_no_function_in_serve_or_cli_is_over_60_lines() -> None:
    root = Path(fediim.__file__).parent
    long = []
    for package in CHECKED:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    assert node.end_lineno is not None
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        long.append(f"{path.relative_to(root)}::{node.name} ({lines} lines)")
    assert not long, long
