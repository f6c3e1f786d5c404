"""Provenance of a results file: the code that computed it, the machine, the run.

One home for what studies (``results.json``) and the benchmark scripts record about where
their numbers came from: :func:`code_fingerprint` (a hash of the computing code and library
versions; also part of every cached cell's key) and :func:`machine_info`.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import os
import pkgutil
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simulations.config import Study

__all__ = ["StudyRun", "code_fingerprint", "finish_machine_info", "machine_info"]

#: Packages whose every module's source enters the fingerprint of a cell's code.
_CODE_PACKAGES = ("fediim.impute", "fediim.privacy", "fediim.federated")
_CODE_MODULES = ("fediim.io.result", "fediim.io.table", "simulations.baselines",
                 "simulations.data", "simulations.missingness", "simulations.methods",
                 "simulations.downstream", "fediim.mi")
#: The folder git is asked about (the repository, when run from a checkout).
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _code_modules() -> list[str]:
    """Every module of :data:`_CODE_PACKAGES` plus :data:`_CODE_MODULES`, sorted."""
    names = set(_CODE_MODULES)
    for package in _CODE_PACKAGES:
        pkg = importlib.import_module(package)
        names.add(package)
        names.update(f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__))
    return sorted(names)


def code_fingerprint() -> str:
    """SHA-256 over the sources of the modules that compute a result, and library versions.

    The engine may be edited while a long run goes on: recorded at the start and the end,
    it ties a number to the exact code, committed or not.
    """
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


def _proc_value(path: str, prefix: str) -> str | None:
    """The rest of the first line of ``path`` starting with ``prefix`` (Linux /proc)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(prefix):
                    return line[len(prefix):].strip(" :\t\n")
    except OSError:
        pass
    return None


def _mem_total_gib() -> float | None:
    kib = _proc_value("/proc/meminfo", "MemTotal")
    try:
        return None if kib is None else round(int(kib.split()[0]) / 1024**2, 1)
    except ValueError:
        return None


def _git(*args: str) -> str | None:
    """Read-only git query (commit id, dirty flag); None outside a checkout."""
    try:
        res = subprocess.run(["git", *args], cwd=_SOURCE_ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    """Where and with what a result was computed: platform, CPU, memory, load, library
    versions, git commit (and whether tracked files were dirty), code fingerprint."""
    import scipy
    import sklearn

    import fediim

    status = _git("status", "--porcelain", "--untracked-files=no")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu_model": _proc_value("/proc/cpuinfo", "model name") or platform.processor() or None,
        "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
        "mem_total_gib": _mem_total_gib(), "loadavg_at_start": _loadavg(),
        "python": platform.python_version(), "numpy": np.__version__,
        "scipy": scipy.__version__, "sklearn": sklearn.__version__,
        "fediim": fediim.__version__, "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_tracked": None if status is None else bool(status),
        "code_fingerprint": code_fingerprint(),
        "thread_env": {k: os.environ[k] for k in
                       ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                       if k in os.environ},
        "argv": list(sys.argv),
    }


def finish_machine_info(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` plus the load average and code fingerprint at the end of a run, and whether
    the code changed while it ran."""
    end_fp = code_fingerprint()
    return {**info, "loadavg_at_end": _loadavg(), "code_fingerprint_at_end": end_fp,
            "code_changed_during_run": end_fp != info.get("code_fingerprint")}
