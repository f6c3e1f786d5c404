"""Private quantiles of a site's columns: OpenDP's quantile mechanism, charged first.

Each (column, α) release is OpenDP's ``make_private_quantile`` under ρ-zCDP with
add/remove-one-record neighbours (symmetric distance 1): the exponential mechanism over a
public grid of candidates, scored by OpenDP's quantile score. One call charges the ledger
ONCE for all its releases (the columns describe the same records, so their ρ's add) before
anything is drawn, so a refusal at budget leaves nothing drawn and nothing charged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fediim.privacy.ledger import PrivacyLedger
from fediim.privacy.mechanisms import (
    OpenDPGaussianNoise,
    QuantileNoiseSource,
    finite_float,
    private_quantile_measurement,
    quantile_score_scale,
    quantile_score_sensitivity,
)

__all__ = ["QUANTILE_GRID_SIZE", "quantile_candidates", "release_quantiles"]

#: Candidates per column. 256 points put ~1/255 of the public range between neighbours
#: (finer than any clipping needs once the bound is widened); the exponential mechanism's
#: error grows only with log(#candidates), so 512 would cost ~ln 2 records more per release.
QUANTILE_GRID_SIZE = 256
_MAP_RTOL = 1e-9  # allowed gap between OpenDP's privacy map and the requested ρ


def quantile_candidates(public_lo: float, public_hi: float,
                        size: int = QUANTILE_GRID_SIZE) -> np.ndarray:
    """``size`` equally spaced public candidates from ``public_lo`` to ``public_hi``."""
    lo, hi = float(public_lo), float(public_hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"public bounds must be finite with lo < hi, got ({lo}, {hi})")
    if isinstance(size, bool) or int(size) != size or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    return np.linspace(lo, hi, int(size))


def _columns(values: np.ndarray, public_lo: float | np.ndarray,
             public_hi: float | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``values`` as (n, m) and the public bounds broadcast to length m."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"values must be 1-D or 2-D, got shape {arr.shape}")
    x = arr.reshape(-1, 1) if arr.ndim == 1 else arr
    if x.shape[1] == 0:
        raise ValueError("values has no column: nothing to release")
    lo = np.broadcast_to(np.asarray(public_lo, dtype=np.float64), (x.shape[1],))
    hi = np.broadcast_to(np.asarray(public_hi, dtype=np.float64), (x.shape[1],))
    return x, lo, hi


def _checked_rho(grid: np.ndarray, alphas: Sequence[float], scales: list[float],
                 rho_each: float, n_columns: int) -> float:
    """ρ of the releases by OpenDP's privacy map at d_in = 1 (one record added/removed),
    checked against the requested ρ per release; returns the total over all columns to
    charge. (The map depends on α and the scale only: one column's grid stands for all.)"""
    cands = tuple(float(c) for c in grid)
    mapped = [float(private_quantile_measurement(cands, a, s).map(1))
              for a, s in zip(alphas, scales, strict=True)]
    worst = max(mapped)
    if worst > rho_each * (1.0 + _MAP_RTOL):
        raise RuntimeError(f"OpenDP privacy map gives rho={worst!r} > requested {rho_each!r}")
    return n_columns * math.fsum(max(rho_each, m) for m in mapped)


def release_quantiles(
    values: np.ndarray,
    public_lo: float | np.ndarray,
    public_hi: float | np.ndarray,
    alphas: Sequence[float],
    *,
    rho: float,
    ledger: PrivacyLedger,
    purpose: str,
    noise: QuantileNoiseSource | None = None,
    grid_size: int = QUANTILE_GRID_SIZE,
) -> np.ndarray:
    """Release the ``alphas``-quantiles of every column of ``values`` at ρ-zCDP in total.

    ``values`` is one column (n,) or several (n, m) with NaN for unobserved cells: each
    column's releases use the records observed on it, clamped to its public bounds
    ``[public_lo, public_hi]`` (scalars or length m). The candidates are
    :func:`quantile_candidates` over those bounds, so every output is a grid point inside
    them. ``rho`` is split equally over the m·k releases; each runs at the Gumbel scale
    :func:`quantile_score_scale` (Δ = max(α, 1 − α) records, OpenDP's stability), whose
    OpenDP privacy map is checked. The ledger gets one entry (mechanism = the source's
    ``quantile_mechanism``, sensitivity = the largest Δ, sigma = its Gumbel scale, ρ) before
    anything is drawn; :class:`BudgetExceeded` leaves nothing drawn. Returns (k,) for one
    column, (m, k) otherwise.
    """
    x, lo, hi = _columns(values, public_lo, public_hi)
    alpha_list = [float(a) for a in alphas]
    if not alpha_list:
        raise ValueError("alphas is empty: nothing to release")
    grids = [quantile_candidates(a, b, grid_size) for a, b in zip(lo, hi, strict=True)]
    r = finite_float("rho", rho, strict=True)
    rho_each = r / (x.shape[1] * len(alpha_list))
    scales = [quantile_score_scale(a, rho_each) for a in alpha_list]
    source: QuantileNoiseSource = OpenDPGaussianNoise() if noise is None else noise
    widest = int(np.argmax([quantile_score_sensitivity(a) for a in alpha_list]))
    ledger.charge(
        mechanism=source.quantile_mechanism,
        sensitivity_l2=quantile_score_sensitivity(alpha_list[widest]),
        sigma=scales[widest],
        rho=_checked_rho(grids[0], alpha_list, scales, rho_each, x.shape[1]),
        purpose=purpose,
        dimension=x.shape[1] * len(alpha_list),
        noise_source=source.name,
    )
    out = np.empty((x.shape[1], len(alpha_list)))
    for j, grid in enumerate(grids):
        col = x[:, j]
        observed = np.clip(col[~np.isnan(col)], lo[j], hi[j])
        for k, (alpha, scale) in enumerate(zip(alpha_list, scales, strict=True)):
            out[j, k] = source.quantile(observed, grid, alpha, scale)
    return out[0] if np.asarray(values).ndim == 1 else out
