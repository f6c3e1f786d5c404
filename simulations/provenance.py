"""Provenance of a study's numbers: the code that computed them, the machine, the run."""

from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulations.config import Study

__all__ = ["StudyRun", "code_fingerprint", "machine_info"]

#: Packages whose every module's source enters the fingerprint of a cell's code.
_CODE_PACKAGES = ("fediim.impute", "fediim.privacy", "fediim.federated")
_CODE_MODULES = ("fediim.io.result", "simulations.data", "simulations.missingness",
                 "simulations.methods")


def _code_modules() -> list[str]:
    """Every module of :data:`_CODE_PACKAGES` plus :data:`_CODE_MODULES`, sorted."""
    names = set(_CODE_MODULES)
    for package in _CODE_PACKAGES:
        pkg = importlib.import_module(package)
        names.add(package)
        names.update(f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__))
    return sorted(names)


def code_fingerprint() -> str:
    """SHA-256 over the sources of the modules that compute a cell, and library versions."""
    import scipy
    import sklearn

    h = hashlib.sha256()
    for name in _code_modules():
        mod = importlib.import_module(name)
        h.update(name.encode() + b"\0" + Path(str(mod.__file__)).read_bytes())
    for lib in (np, scipy, sklearn):
        h.update(f"{lib.__name__}={lib.__version__}".encode())
    try:
        import opendp

        h.update(f"opendp={getattr(opendp, '__version__', '?')}".encode())
    except ImportError:  # pragma: no cover
        pass
    return h.hexdigest()



@dataclass
class StudyRun:
    """What :func:`simulations.runner.run_study` produced."""

    study: Study
    records: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    n_cells: int
    n_cached: int
    n_computed: int
    wall_s: float
    code_fp: str
    out_dir: Path
    cache_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    started: str = ""



def machine_info() -> dict[str, Any]:
    """A little provenance for the results file."""
    import scipy
    import sklearn

    import fediim

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "numpy": np.__version__, "scipy": scipy.__version__,
            "sklearn": sklearn.__version__, "fediim": fediim.__version__,
            "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
            else None}
