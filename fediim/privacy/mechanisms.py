"""Gaussian and quantile mechanisms under ρ-zCDP, sensitivities and ε/δ conversions (OpenDP).

Privacy unit: one record at one site (add/remove neighbours, DESIGN §2 "Accounting").
Budgets compose sequentially (ρ's add) and are shown as (ε, δ) via OpenDP's zCDP →
approximate-DP conversion (tighter than ρ + 2√(ρ ln 1/δ)).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np

import fediim.privacy.opendp_api as dp
from fediim.privacy.discrete_gaussian import opendp_discrete_gaussian, seeded_discrete_gaussian

__all__ = [
    "IntegerNoiseSource",
    "NoiseSource",
    "OpenDPGaussianNoise",
    "QuantileNoiseSource",
    "SeededGaussianNoise",
    "count_sensitivity",
    "epsilon_to_rho",
    "gaussian_sigma",
    "gram_sensitivity",
    "private_quantile_measurement",
    "quantile_score_denominator",
    "quantile_score_scale",
    "quantile_score_sensitivity",
    "quantile_scores",
    "rho_to_epsilon",
]

# --------------------------------------------------------------------------- validation


def finite_float(name: str, value: float, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float, checked finite and >= (or > if ``strict``) ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, not bool")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {op} {minimum}, got {value!r}")
    return v


def check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    return d


# --------------------------------------------------------------------------- conversions


def _float_vector_space(size: int) -> tuple[Any, Any]:
    """OpenDP's metric space of float vectors of length ``size`` under the L2 distance."""
    return (
        dp.vector_domain(dp.atom_domain(T=float, nan=False), size=size),
        dp.l2_distance(T=float),
    )


@lru_cache(maxsize=128)
def gaussian_measurement(size: int, sigma: float) -> dp.Measurement:
    """Gaussian mechanism (ρ-zCDP, exact sampler) on a float vector of length ``size``."""
    return _float_vector_space(size) >> dp.m.then_gaussian(scale=sigma)


@lru_cache(maxsize=1)
def _unit_zcdp_to_approx() -> dp.Measurement:
    """A scalar Gaussian (σ = 1, so map(d) = d²/2) converted to approximate DP."""
    meas = dp.m.make_gaussian(
        dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), scale=1.0
    )
    return dp.c.make_zCDP_to_approxDP(meas)


def _classical_epsilon(rho: float, delta: float) -> float:
    """Bun & Steinke (2016, Prop. 1.3): ρ-zCDP ⇒ (ρ + 2√(ρ ln 1/δ), δ)-DP."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def rho_to_epsilon(rho: float, delta: float) -> float:
    """ε such that ρ-zCDP implies (ε, δ)-DP, from OpenDP's ``make_zCDP_to_approxDP``.

    The conversion is driven through a unit Gaussian whose privacy map returns (at least) ρ,
    so the result is OpenDP's, never optimistic. For very large ρ (≳ 7·10⁴) OpenDP's
    numerics overflow and the classical bound ρ + 2√(ρ ln 1/δ) (valid, looser) is used.
    """
    r = float(rho)
    if math.isnan(r) or r < 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}")
    d = check_delta(delta)
    if r == 0.0:
        return 0.0
    if math.isinf(r):
        return math.inf
    # map(d_in) = d_in²/2 with upward rounding; nudging √(2ρ) up keeps the mapped ρ >= ρ.
    d_in = float(np.nextafter(math.sqrt(2.0 * r), math.inf))
    try:
        eps = float(_unit_zcdp_to_approx().map(d_in).epsilon(d))
    except dp.OpenDPException:
        return _classical_epsilon(r, d)
    return eps


def epsilon_to_rho(epsilon: float, delta: float) -> float:
    """Largest ρ whose (OpenDP) conversion gives ε' <= ``epsilon`` at ``delta``.

    Bisection on :func:`rho_to_epsilon` to a relative tolerance of 1e-9; the returned ρ
    always satisfies ``rho_to_epsilon(rho, delta) <= epsilon``. Use it to turn a site's
    (ε, δ) budget into the ρ budget its ledger accounts in.
    """
    e = float(epsilon)
    if math.isnan(e) or e < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    d = check_delta(delta)
    if math.isinf(e):
        return math.inf
    lo, hi = 0.0, max(1.0, e)
    while rho_to_epsilon(hi, d) <= e:
        lo, hi = hi, 2.0 * hi
        if not math.isfinite(hi):
            raise ValueError(f"epsilon={epsilon!r} is too large to invert")
    for _ in range(2000):  # ~35 iterations in practice; the cap only guards against hi -> 0
        if hi - lo <= 1e-9 * hi:
            break
        mid = 0.5 * (lo + hi)
        if rho_to_epsilon(mid, d) <= e:
            lo = mid
        else:
            hi = mid
    return lo


def gaussian_sigma(sensitivity_l2: float, rho: float) -> float:
    """Noise scale σ = Δ₂/√(2ρ) of the Gaussian mechanism that is exactly ρ-zCDP.

    (A Gaussian with scale σ on a query of L2 sensitivity Δ₂ is Δ₂²/(2σ²)-zCDP.)
    """
    delta2 = finite_float("sensitivity_l2", sensitivity_l2)
    r = float(rho)
    if math.isnan(r) or r <= 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    return delta2 / math.sqrt(2.0 * r)


# --------------------------------------------------------------------------- sensitivities


def gram_sensitivity(m: int) -> float:
    """L2 sensitivity of the released upper triangle of an augmented Gram matrix.

    Each record contributes z zᵀ with z = (1, t_1, …, t_m) and every t_j clamped to
    [−½, ½]; adding or removing one record changes G by ±z zᵀ. The release is the upper
    triangle of G (diagonal included), flattened, so the change has squared L2 norm
    ``sum_{i<=j} z_i² z_j² = ((sum z_i²)² + sum z_i⁴) / 2``, increasing in every |t_j|:
    its maximum, at the corners of the box, is ``((1 + m/4)² + 1 + m/16) / 2``. That is
    ~25% below the Frobenius bound ‖z zᵀ‖_F = ‖z‖² <= 1 + m/4 (DESIGN §2), which also
    counts each off-diagonal entry twice although it is released once (m = 5: 1.785 vs
    2.25; noise std scales with it). Callers must clamp before forming G.
    """
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 0:
        raise ValueError(f"m must be a non-negative int, got {m!r}")
    frob = 1.0 + int(m) / 4.0
    return math.sqrt((frob**2 + 1.0 + int(m) / 16.0) / 2.0)


def count_sensitivity() -> float:
    """L2 (= L1) sensitivity of a count: adding or removing one record changes it by 1."""
    return 1.0


# --------------------------------------------------------------------------- quantiles
#
# OpenDP's private quantile (``make_private_quantile``, Smith 2011) scores each public
# candidate c by s(c) = |den·#(x < c) − num·(n − #(x = c))| with α ≈ num/den (integers), and
# reports the candidate of least score with Gumbel noise of scale ``scale·den`` (report noisy
# max = the exponential mechanism). Input metric: symmetric distance, where d_in = 1 is
# exactly one record added or removed — the privacy unit "one record at one site".


def _quantile_space() -> tuple[Any, Any]:
    """Float datasets of any size (NaN excluded) under the symmetric (add/remove) distance."""
    return dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.symmetric_distance()


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    return a


@lru_cache(maxsize=64)
def _score_transformation(candidates: tuple[float, ...], alpha: float) -> dp.Transformation:
    """OpenDP's quantile score transformation (deterministic: no noise)."""
    return dp.t.make_quantile_score_candidates(*_quantile_space(), list(candidates), alpha)


@lru_cache(maxsize=64)
def quantile_score_denominator(alpha: float) -> int:
    """The integer ``den`` with α ≈ num/den that OpenDP's quantile score uses.

    Read off OpenDP itself: on the one-record dataset [0], a candidate below the record
    scores num and one above scores den − num, so their sum is den.
    """
    scores = _score_transformation((-1.0, 1.0), _check_alpha(alpha))([0.0])
    return int(scores[0]) + int(scores[1])


def quantile_score_sensitivity(alpha: float) -> float:
    """L∞ sensitivity of OpenDP's quantile scores, in records: max(α, 1 − α) (rational α).

    Adding one record below a candidate moves its score by at most num, above by at most
    den − num (OpenDP's stability map); divided by den this is the change in units of
    records. The scores of different candidates move in opposite directions, so the
    exponential mechanism at Gumbel scale ``s`` is (2Δ/s)-DP and (Δ/s)²/2-zCDP.
    """
    a = _check_alpha(alpha)
    den = quantile_score_denominator(a)
    stability = int(_score_transformation((0.0,), a).map(1))
    return stability / den


def quantile_score_scale(alpha: float, rho: float) -> float:
    """Gumbel scale (in records) that makes one quantile release exactly ρ-zCDP: Δ/√(2ρ)."""
    r = finite_float("rho", rho, strict=True)
    return quantile_score_sensitivity(alpha) / math.sqrt(2.0 * r)


def quantile_scores(values: np.ndarray, candidates: np.ndarray, alpha: float) -> np.ndarray:
    """OpenDP's integer quantile scores of ``candidates`` on ``values`` (finite, 1-D)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError("values must be finite (drop NaN and clamp first)")
    cands = tuple(float(c) for c in np.asarray(candidates, dtype=np.float64))
    out = _score_transformation(cands, _check_alpha(alpha))(np.ascontiguousarray(arr))
    return np.asarray(out, dtype=np.int64)


@lru_cache(maxsize=256)
def private_quantile_measurement(candidates: tuple[float, ...], alpha: float,
                                 scale: float) -> dp.Measurement:
    """OpenDP's ρ-zCDP private quantile over ``candidates`` (symmetric distance input)."""
    return dp.m.make_private_quantile(
        *_quantile_space(), dp.zero_concentrated_divergence(), list(candidates),
        _check_alpha(alpha), finite_float("scale", scale, strict=True))


# --------------------------------------------------------------------------- noise sources


@runtime_checkable
class NoiseSource(Protocol):
    """Draws i.i.d. N(0, σ²) noise; ``name`` is recorded in the ledger with each release."""

    name: str

    def sample(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """Noise array of the given shape."""
        ...


@runtime_checkable
class IntegerNoiseSource(Protocol):
    """Draws i.i.d. discrete Gaussian N_Z(0, σ²) noise, truncated at
    :func:`~fediim.privacy.discrete_gaussian.noise_bound` (the distributed release's
    noise); ``name`` is recorded in the ledger with each release."""

    name: str

    def sample_integer(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """int64 noise array of the given shape, every |value| <= noise_bound(σ)."""
        ...


@runtime_checkable
class QuantileNoiseSource(NoiseSource, Protocol):
    """A noise source that also runs the private quantile (exponential mechanism on OpenDP's
    quantile scores); ``quantile_mechanism`` names its sampler in the ledger."""

    quantile_mechanism: str

    def quantile(self, values: np.ndarray, candidates: np.ndarray, alpha: float,
                 scale: float) -> float:
        """The released candidate: least OpenDP quantile score after Gumbel noise of
        ``scale`` records (see :func:`quantile_score_scale`)."""
        ...


class OpenDPGaussianNoise:
    """OpenDP's exact Gaussian sampler — the source for real deployments (the default).

    Every call is ONE release of a whole vector through
    ``vector_domain(atom_domain(T=float, nan=False), size=N), l2_distance`` >>
    ``then_gaussian(scale=σ)`` (~3.7 ms per 36-vector, ~50 µs per value: never loop per
    element). :func:`release_gaussian` passes the actual values through :meth:`perturb`, so
    the released floats are exactly the output of the mechanism whose privacy map was
    checked (no separate float addition of noise to data).
    """

    name: str = "gaussian-opendp-exact"

    def measurement(self, size: int, sigma: float) -> dp.Measurement:
        """The OpenDP measurement used for a vector of length ``size`` at scale σ."""
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return gaussian_measurement(int(size), finite_float("sigma", sigma, strict=True))

    def perturb(self, values: np.ndarray, sigma: float) -> np.ndarray:
        """Release ``values`` (finite floats, any shape) plus Gaussian noise, in one call."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.size == 0:
            return arr.copy()
        if not np.all(np.isfinite(arr)):
            raise ValueError("values must be finite")  # OpenDP does not check its domain
        flat = arr.reshape(-1)
        out = np.asarray(self.measurement(flat.size, sigma)(np.ascontiguousarray(flat)),
                         dtype=np.float64)
        if out.shape != flat.shape:
            raise RuntimeError(f"OpenDP returned {out.shape}, expected {flat.shape}")
        return out.reshape(arr.shape)

    def sample(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """Pure noise of the given shape: one release of a zero vector."""
        return self.perturb(np.zeros(shape, dtype=np.float64), sigma)

    def sample_integer(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """int64 discrete Gaussian N_Z(0, σ²) noise from OpenDP's exact sampler (one release
        of an integer zero vector), truncated at ``noise_bound(σ)``."""
        return opendp_discrete_gaussian(shape, finite_float("sigma", sigma, strict=True))

    quantile_mechanism: str = "private-quantile (opendp make_private_quantile, exact gumbel)"

    def quantile(self, values: np.ndarray, candidates: np.ndarray, alpha: float,
                 scale: float) -> float:
        """One run of OpenDP's ``make_private_quantile`` (zCDP) on ``values`` (finite)."""
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(arr)):
            raise ValueError("values must be finite")  # OpenDP does not check its domain
        cands = tuple(float(c) for c in np.asarray(candidates, dtype=np.float64))
        return float(private_quantile_measurement(cands, alpha, scale)(np.ascontiguousarray(arr)))


class SeededGaussianNoise:
    """numpy Generator noise: reproducible simulations and tests only, never deployments.

    Floating-point Gaussian samplers are not exact (see Mironov 2012) and a known seed
    makes the noise public; the name written to the ledger says so.
    """

    name: str = "gaussian-numpy-seeded (simulation only, not for deployment)"

    def __init__(self, seed: int | np.random.SeedSequence | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def sample(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """Noise array of the given shape."""
        s = finite_float("sigma", sigma, strict=True)
        return self._rng.normal(0.0, s, size=shape)

    @property
    def state(self) -> dict:
        """The generator's state (JSON-able), to continue the stream in another process."""
        return self._rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self._rng.bit_generator.state = value

    def sample_integer(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        """int64 discrete Gaussian N_Z(0, σ²) noise (Canonne-Kamath-Steinke rejection from a
        discrete Laplace on the seeded generator), truncated at ``noise_bound(σ)``."""
        return seeded_discrete_gaussian(self._rng, shape,
                                        finite_float("sigma", sigma, strict=True))

    quantile_mechanism: str = ("private-quantile (opendp quantile scores, numpy-seeded gumbel "
                               "argmin; simulation only)")

    def select_min(self, scores: np.ndarray, scale: float) -> int:
        """Index of the least score after Gumbel(0, ``scale``) noise: the exponential
        mechanism, P(i) ∝ exp(−scores[i] / scale) (OpenDP's report-noisy-min)."""
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.size == 0:
            raise ValueError("scores is empty: nothing to select from")
        g = self._rng.gumbel(0.0, finite_float("scale", scale, strict=True), size=s.shape)
        return int(np.argmax(g - s))

    def quantile(self, values: np.ndarray, candidates: np.ndarray, alpha: float,
                 scale: float) -> float:
        """The same mechanism as OpenDP's ``make_private_quantile`` at the same scale (so
        the same privacy with private noise): OpenDP's integer scores, Gumbel noise of
        ``scale · den`` from the seeded generator."""
        cands = np.asarray(candidates, dtype=np.float64).reshape(-1)
        scores = quantile_scores(values, cands, alpha)
        return float(cands[self.select_min(scores, scale * quantile_score_denominator(alpha))])
