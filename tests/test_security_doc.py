"""SECURITY.md names a test for every claim: each named test must exist."""

from __future__ import annotations

import re

from tests.paths import REPO


def test_every_test_named_in_security_md_exists() -> None:
    text = (REPO / "SECURITY.md").read_text(encoding="utf-8")
    sources = {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8")
               for p in (REPO / "tests").rglob("test_*.py")}
    missing, current = [], None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?\*?`", text):
        path, name = match.group(1), match.group(2)
        current = path or current
        if path and path not in sources:
            missing.append(path)
        elif name and f"def {name}" not in sources.get(current or "", ""):
            missing.append(f"{current}::{name}")
    assert missing == []
