"""Shared helpers for the benchmark scripts: data, masking, NRMSE, baselines, provenance.

Not part of the fediim package; imported by ``paper_protocol.py`` and ``speed.py`` (which run
with ``benchmarks/`` on ``sys.path`` as their script directory).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``shared/datasets`` beside the repository root (``../shared/datasets`` from the repo).
DEFAULT_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

#: The paper protocol: this fraction of rows loses one attribute each.
MISSING_ROW_FRACTION = 0.05

#: The authors' reference setting for IIM (their Java code on the ASF example).
REFERENCE_IIM_PARAMS: dict[str, Any] = {
    "scale": False,
    "n_neighbors": 10,
    "ell_grid": tuple(range(1, 97, 5)),
    "include_global": False,
    "alpha": 1e-3,
}


# -- data ---------------------------------------------------------------------------------
def load_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """A numeric CSV with a header row as a float matrix (empty fields -> NaN)."""
    import pandas as pd

    df = pd.read_csv(path)
    return df.to_numpy(dtype=np.float64), [str(c) for c in df.columns]


def mask_rows(n: int, m: int, seed: int, frac: float = MISSING_ROW_FRACTION,
              count: str = "round") -> tuple[np.ndarray, np.ndarray]:
    """Paper protocol mask: ``round(frac * n)`` distinct random rows, one random attribute each.

    Uses ``np.random.default_rng(seed)``: first the rows (without replacement), then one
    uniformly random column per chosen row. ``count="floor"`` takes ``int(frac * n)`` rows
    instead, which is what the reference table in shared/datasets/README.md used (its mean
    and kNN numbers are reproduced exactly that way; the counts differ on ccs, wine_red and
    wine_white, e.g. ccs 52 vs 51 rows, and then so do all the masks).
    """
    if count not in ("round", "floor"):
        raise ValueError(f"count must be 'round' or 'floor', got {count!r}")
    rng = np.random.default_rng(seed)
    k = int(round(frac * n)) if count == "round" else int(frac * n)
    rows = rng.choice(n, size=k, replace=False)
    cols = rng.integers(0, m, size=k)
    return rows, cols


def apply_mask(X: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    Xm = np.array(X, dtype=np.float64, copy=True)
    Xm[rows, cols] = np.nan
    return Xm


def nrmse(imputed: np.ndarray, truth: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """NRMSE pooled over the masked cells: each error divided by its attribute's std.

    The std is that of the full (unmasked) column, ddof=0.
    """
    sd = truth.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    err = (imputed[rows, cols] - truth[rows, cols]) / sd[cols]
    return float(np.sqrt(np.mean(err**2)))


def rms(imputed: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Plain (not normalised) RMS error over the cells in ``mask``."""
    d = imputed[mask] - truth[mask]
    return float(np.sqrt(np.mean(d**2)))


def synthetic(n: int, m: int, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    """Nonlinear correlated synthetic data, ``n x m`` with ``m <= 9``.

    A latent 3-d Gaussian with correlated components; each feature is a smooth nonlinear
    function of the latent variables plus Gaussian noise of ``noise`` times its std.
    """
    if not 1 <= m <= 9:
        raise ValueError(f"synthetic data has 1..9 features, got {m}")
    rng = np.random.default_rng(seed)
    chol = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.3, -0.4, 0.866]])
    z = rng.standard_normal((n, 3)) @ chol.T
    z1, z2, z3 = z.T
    feats = [
        np.sin(z1) + 0.5 * z2,
        z1 * z2,
        np.exp(0.5 * z2),
        np.tanh(z3) + 0.7 * z1,
        z2**2 - z3,
        np.cos(z1 + z3),
        z3**3 / 3 + z2,
        np.log1p(np.exp(z1 - z2)),
        z1 + z2 + z3,
    ]
    X = np.column_stack(feats[:m])
    X += noise * X.std(axis=0) * rng.standard_normal(X.shape)
    return X


# -- baselines ----------------------------------------------------------------------------
def knn_zscored(Xm: np.ndarray, n_neighbors: int = 10) -> np.ndarray:
    """sklearn KNNImputer on data z-scored with the masked matrix's nanmean/nanstd.

    Observed cells are copied back exactly (the z-score round trip alone would perturb them
    by float round-off, ~1e-15 relative).
    """
    from sklearn.impute import KNNImputer

    mu = np.nanmean(Xm, axis=0)
    sd = np.nanstd(Xm, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    out = KNNImputer(n_neighbors=n_neighbors).fit_transform((Xm - mu) / sd) * sd + mu
    observed = ~np.isnan(Xm)
    out[observed] = Xm[observed]
    return out


# -- provenance / output ------------------------------------------------------------------
def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError):
        pass
    return None


def _git(*args: str) -> str | None:
    """Read-only git query (commit id, dirty flag) for provenance; None when unavailable."""
    try:
        res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def engine_fingerprint() -> str:
    """sha256 over the source files of the loaded ``fediim`` modules (``import fediim`` loads
    the IIMImputer engine). The engine may be edited while a benchmark runs: this ties a
    result to the exact code, committed or not."""
    import fediim  # noqa: F401

    files = sorted({Path(mod.__file__) for name, mod in list(sys.modules.items())
                    if (name == "fediim" or name.startswith("fediim."))
                    and getattr(mod, "__file__", None)})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def machine_info() -> dict[str, Any]:
    import scipy
    import sklearn

    import fediim

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gib": _mem_total_gib(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "fediim": getattr(fediim, "__version__", None),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_tracked": None if status is None else bool(status),
        "fediim_source_sha256": engine_fingerprint(),
        "thread_env": {k: os.environ[k] for k in
                       ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                       if k in os.environ},
    }


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"
