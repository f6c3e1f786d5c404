"""The one way a site releases a statistic: the Gaussian mechanism, charged first."""

from __future__ import annotations

import numpy as np

from fediim.privacy.ledger import PrivacyLedger
from fediim.privacy.mechanisms import (
    NoiseSource,
    OpenDPGaussianNoise,
    finite_float,
    gaussian_measurement,
    gaussian_sigma,
)

__all__ = ["release_gaussian"]

_MAP_RTOL = 1e-9  # allowed gap between OpenDP's privacy map and the requested ρ



def release_gaussian(
    values: np.ndarray,
    *,
    sensitivity_l2: float,
    rho: float,
    ledger: PrivacyLedger,
    purpose: str,
    noise: NoiseSource | None = None,
    mechanism: str = "gaussian",
) -> np.ndarray:
    """Release ``values`` with the Gaussian mechanism at ρ-zCDP, charging ``ledger`` first.

    Mechanism: every value gets i.i.d. N(0, σ²) noise with σ = Δ₂/√(2ρ), where
    ``sensitivity_l2`` = Δ₂ bounds the L2 norm of the change of the whole flattened array
    when one record is added or removed (e.g. :func:`gram_sensitivity` for a Gram upper
    triangle). Such a release is ρ-zCDP; OpenDP's privacy map of the very measurement is
    checked to give <= ρ (1e-9 relative), and the ledger is charged that ρ (or OpenDP's
    value if a hair larger) BEFORE any noise is drawn: if the budget would be exceeded,
    :class:`BudgetExceeded` is raised and nothing is drawn or returned. The whole array is
    noised in one call and returned (float64) in its original shape. If drawing fails after
    the charge, the spend stays recorded (conservative).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("values is empty: nothing to release")
    if not np.all(np.isfinite(arr)):
        raise ValueError("values must be finite (clamp and check before releasing)")
    delta2 = finite_float("sensitivity_l2", sensitivity_l2, strict=True)
    r = finite_float("rho", rho, strict=True)
    source: NoiseSource = OpenDPGaussianNoise() if noise is None else noise
    sigma = gaussian_sigma(delta2, r)
    n = int(arr.size)
    if isinstance(source, OpenDPGaussianNoise):
        meas = source.measurement(n, sigma)
    else:
        meas = gaussian_measurement(n, sigma)
    mapped = float(meas.map(delta2))
    if mapped > r * (1.0 + _MAP_RTOL):
        raise RuntimeError(
            f"OpenDP privacy map gives rho={mapped!r} > requested {r!r} (sigma={sigma!r})"
        )
    ledger.charge(
        mechanism=mechanism,
        sensitivity_l2=delta2,
        sigma=sigma,
        rho=max(r, mapped),
        purpose=purpose,
        dimension=n,
        noise_source=source.name,
    )
    flat = arr.reshape(-1)
    if isinstance(source, OpenDPGaussianNoise):
        out = np.asarray(meas(flat.tolist()), dtype=np.float64)
    else:
        noise_vec = np.asarray(source.sample((n,), sigma), dtype=np.float64)
        if noise_vec.shape != (n,) or not np.all(np.isfinite(noise_vec)):
            raise RuntimeError(f"noise source {source.name!r} returned bad noise")
        out = flat + noise_vec
    if out.shape != (n,):
        raise RuntimeError(f"noise release returned shape {out.shape}, expected {(n,)}")
    return out.reshape(arr.shape)
