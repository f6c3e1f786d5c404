"""Distributed noise for secure sums: each site adds a share, the SUM is ρ-zCDP.

Each of n sites adds i.i.d. discrete Gaussian noise N_Z(0, σ²) to its integer-quantised
statistic; the coordinator sees only the sum over sites (secure aggregation, in
``fediim.protocol``), whose noise is the sum of n discrete Gaussians. That sum is not
itself a discrete Gaussian; Kairouz, Liu & Steinke (ICML 2021) bound its privacy loss
(:func:`ddg_rho`). A site is charged the ρ of the sum, under the stated assumption that at
least n sites' noise is in every released sum.
"""

from __future__ import annotations

import math

import numpy as np

from fediim.privacy.discrete_gaussian import integer_gaussian_measurement, noise_bound
from fediim.privacy.ledger import PrivacyLedger
from fediim.privacy.mechanisms import IntegerNoiseSource, OpenDPGaussianNoise, finite_float

__all__ = [
    "DDG_MECHANISM",
    "ddg_rho",
    "ddg_sigma",
    "noise_bound",
    "quantise",
    "quantised_sensitivity",
    "release_distributed",
]

DDG_MECHANISM: str = "distributed discrete gaussian"
MIN_SIGMA = 0.5  # Proposition 14 of Kairouz, Liu & Steinke assumes σ >= 1/2
QUANTISE_LIMIT = 2**62  # |scaled value| above it is refused: a secure sum needs headroom
_MAP_RTOL = 1e-9  # allowed gap between OpenDP's privacy map and the requested ρ


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _prop14_rho(l2: float, l1: float, sigma: float, m: int, dimension: int,
                tau: float) -> float:
    """Proposition 14's bound on D_α / α for m summands (all three terms, α >= 1)."""
    a = l2 / (math.sqrt(m) * sigma)  # Δ₂ over the standard deviation of the sum
    first = a * a / 2.0 + tau * dimension  # (α a²/2 + τ d)/α <= a²/2 + τ d for α >= 1
    second = (a * a + 2.0 * l1 * tau / (math.sqrt(m) * sigma) + tau * tau * dimension) / 2.0
    third = (a + tau * math.sqrt(dimension)) ** 2 / 2.0
    return min(first, second, third)


def ddg_rho(sensitivity_l2: float, sigma: float, n_summands: int, dimension: int,
            sensitivity_l1: float | None = None) -> float:
    """ρ-zCDP (= ε²/2 of ε-concentrated DP) of releasing x + Z, Z the sum of ``n_summands``
    i.i.d. ``dimension``-dimensional discrete Gaussians N_Z(0, σ²), x integer with L2
    sensitivity Δ₂ (and L1 sensitivity Δ₁).

    Kairouz, Liu & Steinke (ICML 2021; arXiv:2102.06387), Proposition 14 (Eq. 17), for
    σ >= 1/2 and every order α >= 1, with τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ² k/(k+1)):
    D_α(x+Z ‖ x'+Z)/α <= min{ Δ₂²/(2nσ²) + τd/α, ½(Δ₂²/(nσ²) + 2τΔ₁/(√n σ) + τ²d),
    ½(Δ₂/(√n σ) + τ√d)² }; bounding τd/α by τd (α >= 1) makes each term a ρ (the form of
    their Theorem 1; the same three terms as the authors' reference code,
    google-research/federated ``distributed_dp/accounting_utils.compute_rdp_dgaussian``).
    The result is the least such bound over m <= n summands: the sum of n is the sum of m
    plus independent noise (post-processing), so ρ never grows with n. τ vanishes like
    exp(−π²σ²), so ρ → Δ₂²/(2nσ²), the continuous Gaussian's ρ at the sum's variance; with
    n = 1 it is exactly the discrete Gaussian's Δ₂²/(2σ²) (Canonne, Kamath & Steinke 2020).
    Without ``sensitivity_l1``, Δ₁ = Δ₂·min(√d, Δ₂) (Cauchy-Schwarz; and Σ|v_i| <= Σv_i²
    for an integer difference v).
    """
    l2 = finite_float("sensitivity_l2", sensitivity_l2)
    s = finite_float("sigma", sigma, minimum=MIN_SIGMA)
    n = _positive_int("n_summands", n_summands)
    d = _positive_int("dimension", dimension)
    l1 = l2 * min(math.sqrt(d), l2)
    if sensitivity_l1 is not None:
        l1 = min(l1, finite_float("sensitivity_l1", sensitivity_l1))
    if l2 == 0.0:
        return 0.0
    best, tau = math.inf, 0.0
    for m in range(1, n + 1):
        best = min(best, _prop14_rho(l2, l1, s, m, d, 10.0 * tau))
        tau += math.exp(-2.0 * math.pi**2 * s * s * m / (m + 1))  # adds k = m for m + 1
    return best


def ddg_sigma(sensitivity_l2: float, rho: float, n_summands: int, dimension: int) -> float:
    """The smallest per-site σ (>= 1/2) whose sum over ``n_summands`` sites is ρ-zCDP by
    :func:`ddg_rho`: bisection to 1e-12 relative, always ``ddg_rho(result) <= rho``.

    Every term of the bound is at least Δ₂²/(2nσ²), so σ >= Δ₂/√(2nρ) starts the search.
    """
    l2 = finite_float("sensitivity_l2", sensitivity_l2, strict=True)
    r = finite_float("rho", rho, strict=True)
    n = _positive_int("n_summands", n_summands)
    d = _positive_int("dimension", dimension)

    def affordable(sigma: float) -> bool:
        return ddg_rho(l2, sigma, n, d) <= r

    lo = max(MIN_SIGMA, l2 / math.sqrt(2.0 * n * r))
    if affordable(lo):
        return lo
    hi = 2.0 * lo
    while not affordable(hi):
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if affordable(mid):
            hi = mid
        else:
            lo = mid
    return hi


def quantise(values: np.ndarray, scale: float) -> np.ndarray:
    """int64 ``round(values · scale)`` (numpy's deterministic round-half-to-even).

    Raises on non-finite values and on any |values · scale| > 2**62, which would leave a
    secure sum no headroom in 64 bits.
    """
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("values must be finite to be quantised")
    scaled = arr * finite_float("scale", scale, strict=True)
    if scaled.size and float(np.max(np.abs(scaled))) > QUANTISE_LIMIT:
        raise ValueError(f"|values * scale| exceeds 2**62 (scale={scale!r}): lower the scale")
    return np.rint(scaled).astype(np.int64)


def quantised_sensitivity(sensitivity_l2: float, scale: float, n_affected: int) -> float:
    """L2 sensitivity of ``quantise(sum over records, scale)``: scale·Δ₂ + √n_affected,
    when one record moves the real sum by u, ‖u‖₂ <= Δ₂, on at most ``n_affected`` values.

    Proof: an untouched value's sum is unchanged, so its rounding is too; a touched one
    moves by scale·u_i + (e_i − e'_i) with rounding errors |e| <= ½, so the change is
    scale·u + r with ‖r‖₂ <= √n_affected, and ‖scale·u + r‖₂ <= scale·Δ₂ + √n_affected.
    """
    l2 = finite_float("sensitivity_l2", sensitivity_l2)
    k = _positive_int("n_affected", n_affected)
    return finite_float("scale", scale, strict=True) * l2 + math.sqrt(k)


def _checked_integers(values: np.ndarray) -> np.ndarray:
    """``values`` as a flat int64 vector, refused if not integer or beyond 2**62."""
    arr = np.asarray(values)
    if arr.size == 0:
        raise ValueError("values is empty: nothing to release")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"values must be integers (quantise first), got {arr.dtype}")
    flat = arr.reshape(-1).astype(np.int64)
    if np.any(np.abs(flat) > QUANTISE_LIMIT):
        raise ValueError("|values| exceeds 2**62: no headroom for the noise")
    return flat


def _opendp_cross_check(sensitivity_l2: float, sigma: float, n_summands: int,
                        dimension: int, rho: float) -> float:
    """OpenDP's ρ for ONE discrete Gaussian of the sum's scale σ√n: equal to ddg_rho for
    n = 1 and a lower bound of it for n > 1, so it must not exceed the requested ρ."""
    meas = integer_gaussian_measurement(dimension, sigma * math.sqrt(n_summands))
    mapped = float(meas.map(sensitivity_l2))
    if mapped > rho * (1.0 + _MAP_RTOL):
        raise RuntimeError(f"OpenDP's discrete Gaussian map gives rho={mapped!r} > the "
                           f"requested {rho!r} (sigma={sigma!r}, n={n_summands})")
    return mapped


def release_distributed(values: np.ndarray, *, sensitivity_l2: float, rho: float,
                        n_summands: int, ledger: PrivacyLedger, purpose: str,
                        assumption: str, noise: IntegerNoiseSource | None = None) -> np.ndarray:
    """One site's share of a distributed release: int64 ``values`` + this site's discrete
    Gaussian noise at σ = ddg_sigma(Δ₂, ρ, n_summands, len), so that the SUM over at least
    ``n_summands`` sites' shares is ρ-zCDP (:func:`ddg_rho`).

    ``sensitivity_l2`` bounds the L2 change of the SUM of the integer statistics when one
    record changes (:func:`quantised_sensitivity`). The ledger is charged ρ (or OpenDP's
    map of the single discrete Gaussian at the sum's scale, if a hair larger) with
    mechanism :data:`DDG_MECHANISM`, Δ₂, the per-site σ, the dimension and ``assumption``
    (e.g. "honest-but-curious coordinator; at least t=3 sites' noise in every released
    sum") BEFORE noise is drawn: :class:`BudgetExceeded` leaves nothing drawn. Noise is
    truncated at ``noise_bound(σ)`` (cost: see :func:`noise_bound`). Returns int64 values
    of the input's shape.
    """
    flat = _checked_integers(values)
    delta2 = finite_float("sensitivity_l2", sensitivity_l2, strict=True)
    r = finite_float("rho", rho, strict=True)
    n = _positive_int("n_summands", n_summands)
    if not isinstance(assumption, str) or not assumption.strip():
        raise ValueError("assumption must state what the guarantee rests on")
    source: IntegerNoiseSource = OpenDPGaussianNoise() if noise is None else noise
    sigma = ddg_sigma(delta2, r, n, flat.size)
    bound = noise_bound(sigma)
    if bound > QUANTISE_LIMIT:
        raise ValueError(f"sigma={sigma!r} is too large for 64-bit sums")
    mapped = _opendp_cross_check(delta2, sigma, n, flat.size, r)
    ledger.charge(mechanism=DDG_MECHANISM, sensitivity_l2=delta2, sigma=sigma,
                  rho=max(r, mapped), purpose=purpose, dimension=flat.size,
                  noise_source=source.name, assumption=assumption)
    draw = np.asarray(source.sample_integer((flat.size,), sigma))
    if (draw.shape != flat.shape or not np.issubdtype(draw.dtype, np.integer)
            or np.any(np.abs(draw) > bound)):
        raise RuntimeError(f"noise source {source.name!r} returned bad integer noise")
    return (flat + draw.astype(np.int64)).reshape(np.shape(values))
