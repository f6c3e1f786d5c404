"""Shared helpers of the benchmarks on complete tables: data, the paper's masks, NRMSE.

Not part of the fediim package; imported by ``paper_protocol.py`` and ``speed.py`` (which run
with ``benchmarks/`` on ``sys.path`` as their script directory). The baselines, provenance
and the JSON encoding are the project's own: ``simulations.baselines``,
``simulations.provenance``, ``fediim.io.json_results``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fediim.io.table import read_csv

#: ``shared/datasets`` beside the repository root (``../shared/datasets`` from the repo).
DEFAULT_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

#: The paper protocol: this fraction of rows loses one attribute each.
MISSING_ROW_FRACTION = 0.05

#: IIMImputer without the validated choices beyond ell (local quadratic models, the
#: per-pattern blend): the engine as it was before they became the defaults.
BEFORE_IIM_OPTIONS: dict[str, Any] = {"blend": False, "quadratic": False}

#: The authors' reference setting for IIM (their Java code on the ASF example).
REFERENCE_IIM_PARAMS: dict[str, Any] = {
    "scale": False,
    "n_neighbors": 10,
    "ell_grid": tuple(range(1, 97, 5)),
    "include_global": False,
    "alpha": 1e-3,
    **BEFORE_IIM_OPTIONS,
}


# -- data ---------------------------------------------------------------------------------
def load_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """A numeric CSV with a header row as a float matrix (missing markers -> NaN), read by
    ``fediim.io.table.read_csv`` (errors name the file, line and column)."""
    table = read_csv(path)
    return table.values, table.columns


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
