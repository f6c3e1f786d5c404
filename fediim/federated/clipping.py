"""Private clipping bounds: each site's per-column box inside the schema's public bounds.

The public bounds often span many standard deviations of an attribute, so statistics
clamped to them carry noise scaled to a range the data never fills. A site instead
releases two quantiles per column (OpenDP's private quantile, :func:`release_quantiles`),
widens them a little so few records are clamped, and clamps to that box. Everything is in
the federation's scaled coordinates (public bounds = [-1/2, 1/2], see
:func:`~fediim.federated.plan.scale_to_bounds`), and the box always lies inside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fediim.privacy import (
    QUANTILE_GRID_SIZE,
    PrivacyLedger,
    QuantileNoiseSource,
    quantile_score_scale,
    release_quantiles,
)

__all__ = ["CLIP_BUDGET_SHARE", "CLIP_MARGIN", "CLIP_MIN_RATIO", "CLIP_MIN_WIDTH",
           "CLIP_QUANTILES", "clamp_to_box", "clip_min_records", "exact_clip_quantiles",
           "private_clip_box", "widen_box"]

#: Quantiles released per column (lower, upper), and each side widened by ``CLIP_MARGIN``
#: times their distance. Measured on ccpp, wine and heart (benchmarks/README.md, "Private
#: clipping bounds"): exact boxes clamp 0.03% / 0.8% / 0.2% of cells and are 0.89 / 0.42 /
#: 0.60 of the public range; (0.01, 0.99) clamps less when exact but its noisy release
#: lands in the empty tails far more often.
CLIP_QUANTILES: tuple[float, float] = (0.05, 0.95)
CLIP_MARGIN: float = 0.5
#: Narrowest box allowed, as a fraction of the public range (a near-constant column would
#: otherwise give a degenerate box and blow up coordinates taken relative to it).
CLIP_MIN_WIDTH: float = 1.0 / 32.0
#: Share of a site's ρ the lead should spend on the box (see :func:`clip_min_records`).
CLIP_BUDGET_SHARE: float = 0.1
#: A private box pays only when each quantile's rank from its end, min(α, 1−α)·n, is at
#: least this multiple of the mechanism's rank noise s·ln(#candidates) (s = Gumbel scale
#: in records). Calibrated for the default quantiles and margin on ccpp, wine and heart:
#: at or above it the noisy box clamped <= 0.5% of cells on average (worst site 0.6%);
#: below it up to 2–30%, as noisy quantiles land inside the data.
CLIP_MIN_RATIO: float = 0.125

_HALF = 0.5


def widen_box(q_lo: np.ndarray, q_hi: np.ndarray, *, margin: float = CLIP_MARGIN,
              min_width: float = CLIP_MIN_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Box (lo, hi) per column from two quantiles: widened, inside [-1/2, 1/2], not thin.

    The quantiles are sorted first (noisy ones may cross); each side moves out by
    ``margin`` times their distance; the box is cut to [-1/2, 1/2]; a box narrower than
    ``min_width`` is grown to it around its centre, shifted back inside if needed. So
    always -1/2 <= lo < hi <= 1/2 and hi - lo >= min_width.
    """
    if not margin >= 0 or not math.isfinite(margin):
        raise ValueError(f"margin must be finite and >= 0, got {margin!r}")
    if not 0 < min_width <= 1:
        raise ValueError(f"min_width must lie in (0, 1], got {min_width!r}")
    a = np.clip(np.minimum(q_lo, q_hi), -_HALF, _HALF)
    b = np.clip(np.maximum(q_lo, q_hi), -_HALF, _HALF)
    spread = b - a
    lo = np.maximum(a - margin * spread, -_HALF)
    hi = np.minimum(b + margin * spread, _HALF)
    thin = hi - lo < min_width
    centre = np.clip(0.5 * (lo + hi), -_HALF + 0.5 * min_width, _HALF - 0.5 * min_width)
    lo = np.where(thin, np.maximum(centre - 0.5 * min_width, -_HALF), lo)
    hi = np.where(thin, np.minimum(centre + 0.5 * min_width, _HALF), hi)
    return lo, hi


def exact_clip_quantiles(x_scaled: np.ndarray, quantiles: Sequence[float]) -> np.ndarray:
    """Exact quantiles (m, k) of each column over its observed records (NaN skipped).

    A column with no observed record gets the public bounds (-1/2, 1/2) for every α
    below 1/2 and above it respectively, i.e. no narrowing.
    """
    x = np.clip(np.asarray(x_scaled, dtype=np.float64), -_HALF, _HALF)
    alphas = np.asarray(quantiles, dtype=np.float64)
    out = np.where(alphas < 0.5, -_HALF, _HALF) * np.ones((x.shape[1], 1))
    for j in range(x.shape[1]):
        col = x[~np.isnan(x[:, j]), j]
        if col.size:
            out[j] = np.quantile(col, alphas)
    return out


def private_clip_box(
    x_scaled: np.ndarray,
    rho: float,
    *,
    ledger: PrivacyLedger | None,
    noise: QuantileNoiseSource | None = None,
    quantiles: tuple[float, float] = CLIP_QUANTILES,
    margin: float = CLIP_MARGIN,
    min_width: float = CLIP_MIN_WIDTH,
    clip_columns: Sequence[bool] | np.ndarray | None = None,
    grid_size: int = QUANTILE_GRID_SIZE,
    purpose: str = "clipping bounds",
) -> tuple[np.ndarray, np.ndarray]:
    """A site's clipping box (lo, hi), one entry per column, in scaled coordinates.

    ``x_scaled`` (n, m): the site's records mapped to the public bounds [-1/2, 1/2] (NaN
    = not observed; values outside are clamped). ``rho``: this release's whole budget,
    split equally over the measured columns' 2 quantiles (one ledger charge, before
    anything is drawn; :class:`BudgetExceeded` leaves nothing drawn or charged); with
    ``rho = inf`` the exact quantiles are used and nothing is charged (``ledger`` may then
    be None). ``clip_columns``: public per-column flags (default all); a column left out
    keeps the public bounds and gets no budget — e.g. one the site never measures, or a
    code whose public range is its value set (a noisy quantile of a two-valued column
    falls between the values and would clamp half the records). The quantiles are then
    widened by :func:`widen_box`. Returns arrays ``lo`` < ``hi`` within [-1/2, 1/2].
    """
    x = np.asarray(x_scaled, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x_scaled must be 2-D (records x columns), got shape {x.shape}")
    cols = np.ones(x.shape[1], bool) if clip_columns is None else np.asarray(clip_columns, bool)
    if cols.shape != (x.shape[1],):
        raise ValueError(f"clip_columns must have one flag per column ({x.shape[1]})")
    q = np.tile([-_HALF, _HALF], (x.shape[1], 1))
    if math.isinf(rho) and rho > 0:
        q[cols] = exact_clip_quantiles(x[:, cols], quantiles)
    elif cols.any():
        if ledger is None:
            raise ValueError("a private (finite rho) release needs a ledger to charge")
        q[cols] = release_quantiles(x[:, cols], -_HALF, _HALF, quantiles, rho=rho,
                                    ledger=ledger, purpose=purpose, noise=noise,
                                    grid_size=grid_size)
    return widen_box(q[:, 0], q[:, 1], margin=margin, min_width=min_width)


def clip_min_records(rho: float, n_columns: int, *,
                     quantiles: tuple[float, float] = CLIP_QUANTILES,
                     grid_size: int = QUANTILE_GRID_SIZE) -> float:
    """Fewest records for which :func:`private_clip_box` at ``rho`` over ``n_columns``
    clipped columns is worth it (:data:`CLIP_MIN_RATIO`); ``inf`` rho needs 1 record.

    Compare a public or already-released (noisy) size of the site with it, never the exact
    count: below it, keep the public bounds and spend nothing on the box.
    """
    if math.isinf(rho) and rho > 0:
        return 1.0
    rho_each = rho / (len(quantiles) * n_columns)
    scale = max(quantile_score_scale(a, rho_each) for a in quantiles)
    tail = min(min(a, 1.0 - a) for a in quantiles)
    return CLIP_MIN_RATIO * scale * math.log(grid_size) / tail


def clamp_to_box(x_scaled: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x_scaled`` clamped to the box per column, and how many cells were moved per column
    (NaN stays NaN)."""
    x = np.asarray(x_scaled, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        moved = np.sum((x < lo) | (x > hi), axis=0)
    return np.clip(x, lo, hi), moved
