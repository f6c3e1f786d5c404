"""Where the tests find the repository and ``../shared``, and what a missing piece means.

Outside CI a missing ``../shared`` or optional extra skips the tests that need it; with
``CI=true`` it fails them, so a CI run can never pass by skipping.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    """Skip (locally) or fail (in CI) the current test for ``reason``."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure)", pytrace=False)
    pytest.skip(reason)


def require_file(path: Path) -> Path:
    """``path`` if it exists, else skip/fail (see :func:`missing`)."""
    if not path.exists():
        missing(f"{path} not present")
    return path


def require_module(name: str, extra: str) -> ModuleType:
    """The imported module ``name``, else skip/fail naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed (pip install 'fediim[{extra}]')")
        raise  # unreachable: missing() raises


def benchmark_script(monkeypatch: pytest.MonkeyPatch, script: str, name: str) -> ModuleType:
    """``benchmarks/<script>`` loaded as module ``name`` (registered for the test only):
    the scripts are not a package, and their dataclasses need their module in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
