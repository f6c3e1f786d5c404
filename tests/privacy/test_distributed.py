"""Distributed discrete Gaussian: accounting, quantisation sensitivity, samplers, release."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fediim.privacy import (
    DDG_MECHANISM,
    BudgetExceeded,
    IntegerNoiseSource,
    OpenDPGaussianNoise,
    PrivacyLedger,
    SeededGaussianNoise,
    count_sensitivity,
    ddg_rho,
    ddg_sigma,
    gaussian_sigma,
    gram_sensitivity,
    noise_bound,
    quantise,
    quantised_sensitivity,
    release_distributed,
)
from fediim.privacy import discrete_gaussian as dg
from fediim.privacy.ledger import _checksum
from tests.release_doubles import RecordingNoise

ASSUMPTION = "honest-but-curious coordinator; at least t=3 sites' noise in every released sum"

# --------------------------------------------------------------------------- ddg_rho


def _reference_rho(l2: float, l1: float, sigma: float, n: int, d: int) -> float:
    """Kairouz, Liu & Steinke, Prop. 14 / Eq. 17, written out again as Rényi bounds of
    order α (the form of the authors' compute_rdp_dgaussian), then ρ = sup_α ε(α)/α."""
    tau = 10 * sum(math.exp(-2 * (math.pi * sigma) ** 2 * k / (k + 1)) for k in range(1, n))
    l2_scale, l1_scale = l2 / (math.sqrt(n) * sigma), l1 / (math.sqrt(n) * sigma)

    def eps(order: float) -> float:
        return min(order / 2 * l2_scale**2 + tau * d,
                   order / 2 * (l2_scale**2 + 2 * l1_scale * tau + tau**2 * d),
                   order / 2 * (l2_scale + math.sqrt(d) * tau) ** 2)

    return max(eps(a) / a for a in [1.0, *np.geomspace(1.0001, 512.0, 200)])


@pytest.mark.parametrize(("l2", "sigma", "n", "d"), [
    (3.0, 1.0, 3, 36), (3.0, 1.2, 5, 36), (1.0, 0.9, 4, 1), (40.0, 3.0, 10, 1000),
    (2.0, 1.0, 2, 6)])
def test_ddg_rho_matches_the_paper_written_out_again(l2: float, sigma: float, n: int,
                                                      d: int) -> None:
    l1 = l2 * min(math.sqrt(d), l2)
    assert ddg_rho(l2, sigma, n, d) == pytest.approx(_reference_rho(l2, l1, sigma, n, d),
                                                     rel=1e-12)


def test_ddg_rho_hand_computed_points() -> None:
    # Δ₂=3, σ=1, n=3, d=36: τ = 10(e^−π² + e^−4π²/3) = 5.3650e-4, Δ₁ = 9; the second
    # term wins: (3 + 2·9·τ/√3 + 36τ²)/2 = 1.502793
    assert ddg_rho(3.0, 1.0, 3, 36) == pytest.approx(1.502793, abs=2e-6)
    # an explicit L1 sensitivity below the default tightens the second term
    assert ddg_rho(3.0, 1.0, 3, 36, sensitivity_l1=3.0) == pytest.approx(1.500934, abs=2e-6)
    assert ddg_rho(3.0, 2.0, 1, 36) == 9 / 8  # one summand: the discrete Gaussian exactly
    assert ddg_rho(0.0, 2.0, 3, 36) == 0.0


def test_ddg_rho_monotone_in_sigma_and_n() -> None:
    for l2, d in [(1.0, 1), (3.0, 36), (20.0, 1000)]:
        sigmas = [0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 5.0, 30.0]
        for n in (1, 2, 3, 7):
            rhos = [ddg_rho(l2, s, n, d) for s in sigmas]
            assert all(a > b for a, b in itertools.pairwise(rhos)), (l2, d, n, rhos)
        for s in (0.5, 0.7, 1.0, 3.0):  # at σ = 1/2 the bound of one summand is the least
            rhos = [ddg_rho(l2, s, n, d) for n in range(1, 13)]
            assert all(a >= b for a, b in itertools.pairwise(rhos)), (l2, d, s, rhos)
        big = [ddg_rho(l2, 3.0, n, d) for n in range(1, 13)]
        assert all(a > b for a, b in itertools.pairwise(big))


@pytest.mark.parametrize("n", [1, 3, 20])
def test_ddg_rho_tends_to_the_continuous_gaussian(n: int) -> None:
    for l2, sigma, d in [(3.0, 4.0, 36), (1.0, 3.0, 10_000), (1e4, 1e3, 36)]:
        assert ddg_rho(l2, sigma, n, d) == pytest.approx(l2**2 / (2 * n * sigma**2),
                                                         rel=1e-12)
    gap = ddg_rho(3.0, 1.0, n, 36) / (9 / (2 * n)) - 1  # at σ = 1 the τ terms still show
    assert gap == 0.0 if n == 1 else gap > 1e-4


def test_ddg_rho_refuses_sigma_below_one_half() -> None:
    with pytest.raises(ValueError, match="sigma"):
        ddg_rho(1.0, 0.49, 3, 4)
    with pytest.raises(ValueError, match="n_summands"):
        ddg_rho(1.0, 1.0, 0, 4)


@pytest.mark.parametrize(("l2", "rho", "n", "d"), [
    (3.0, 0.1, 3, 36), (1.0, 0.5, 1, 1), (1787.0, 0.02, 10, 21), (2.0, 1.0, 4, 1000),
    (5.0, 2.0, 2, 6)])
def test_ddg_sigma_inverts_ddg_rho(l2: float, rho: float, n: int, d: int) -> None:
    sigma = ddg_sigma(l2, rho, n, d)
    assert sigma > 0.5
    got = ddg_rho(l2, sigma, n, d)
    assert got <= rho and got == pytest.approx(rho, rel=1e-6)
    assert sigma >= l2 / math.sqrt(2 * n * rho)  # never below the continuous Gaussian's
    if n == 1:
        assert sigma == pytest.approx(gaussian_sigma(l2, rho), rel=1e-9)
    assert ddg_sigma(1.0, 100.0, 3, 4) == 0.5  # a huge budget: the smallest σ allowed


@pytest.mark.parametrize(("l2", "sigma"), [(1.0, 0.7), (3.0, 2.0), (1787.5, 300.0)])
def test_opendp_map_of_one_discrete_gaussian_equals_ddg_rho(l2: float, sigma: float) -> None:
    for d in (1, 36):
        meas = dg.integer_gaussian_measurement(d, sigma)
        assert float(meas.map(l2)) == pytest.approx(ddg_rho(l2, sigma, 1, d), rel=1e-9)
        # n > 1: OpenDP's single discrete Gaussian at the sum's scale is a lower bound
        wide = dg.integer_gaussian_measurement(d, sigma * math.sqrt(5))
        assert float(wide.map(l2)) <= ddg_rho(l2, sigma, 5, d) * (1 + 1e-9)


# --------------------------------------------------------------------------- quantisation


def _gram_upper(records: np.ndarray) -> np.ndarray:
    z = np.hstack([np.ones((len(records), 1)), records])
    iu = np.triu_indices(z.shape[1])
    return np.einsum("ri,rj->ij", z, z)[iu]


def _corner_records(rng: np.random.Generator, count: int, m: int) -> np.ndarray:
    return rng.choice([-0.5, 0.5], size=(count, m))


def test_quantised_gram_sensitivity_on_neighbouring_datasets() -> None:
    rng = np.random.default_rng(7)
    inflated = 0
    for trial in range(600):
        m = int(rng.integers(1, 7))
        scale = float(rng.choice([1.0, 2.0, 4.0, 1000.0, 2.0**20, rng.uniform(0.5, 50)]))
        n_rows = int(rng.integers(0, 40))
        base = (_corner_records(rng, n_rows, m) if trial % 2
                else rng.uniform(-0.5, 0.5, size=(n_rows, m)))
        extra = _corner_records(rng, 1, m) if trial % 3 else rng.uniform(-0.5, 0.5, (1, m))
        k = (m + 1) * (m + 2) // 2
        bound = quantised_sensitivity(gram_sensitivity(m), scale, k)
        change = quantise(_gram_upper(np.vstack([base, extra])), scale) - quantise(
            _gram_upper(base), scale)
        norm = float(np.linalg.norm(change))
        assert norm <= bound, (m, scale, norm, bound)
        inflated += norm > scale * gram_sensitivity(m)
    assert inflated > 10  # rounding does push the change past scale·Δ₂: the √k term is needed


def test_quantised_count_sensitivity_on_neighbouring_datasets() -> None:
    rng = np.random.default_rng(8)
    inflated = False
    for _ in range(500):
        n_cells, scale = int(rng.integers(1, 12)), float(rng.choice([0.5, 1.0, 1.5, 3.3]))
        cells = rng.integers(0, n_cells, size=int(rng.integers(0, 60)))
        counts = np.bincount(cells, minlength=n_cells).astype(float)
        neighbour = counts.copy()
        neighbour[int(rng.integers(0, n_cells))] += 1  # one more record, in one cell
        change = quantise(neighbour, scale) - quantise(counts, scale)
        norm = float(np.linalg.norm(change))
        assert norm <= quantised_sensitivity(count_sensitivity(), scale, 1)
        inflated |= norm > scale * count_sensitivity()
    assert inflated


def test_quantise_is_deterministic_and_refuses_what_cannot_be_summed() -> None:
    out = quantise(np.array([0.5, 1.5, -0.26, 2.0]), 1.0)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 0, 2]
    assert quantise(np.array([[0.1, 0.2]]), 10.0).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="finite"):
        quantise(np.array([1.0, np.nan]), 2.0)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        quantise(np.array([2.0**61]), 4.0)
    with pytest.raises(ValueError, match="scale"):
        quantise(np.array([1.0]), 0.0)


# --------------------------------------------------------------------------- samplers


def _discrete_gaussian_moments(sigma: float) -> tuple[float, float]:
    """Exact variance of N_Z(0, σ²) truncated at noise_bound(σ), and P(X = 0)."""
    k = np.arange(-noise_bound(sigma), noise_bound(sigma) + 1, dtype=float)
    w = np.exp(-(k**2) / (2 * sigma**2))
    return float(np.sum(k**2 * w) / np.sum(w)), float(1.0 / np.sum(w))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 41.7, 2.5e5])
def test_seeded_integer_noise_scale(sigma: float) -> None:
    draws = SeededGaussianNoise(1).sample_integer((200_000,), sigma)
    var, p0 = _discrete_gaussian_moments(sigma)
    assert draws.dtype == np.int64 and draws.shape == (200_000,)
    assert np.var(draws) == pytest.approx(var, rel=0.02)
    assert abs(np.mean(draws)) < 4 * math.sqrt(var / 200_000)
    assert abs(np.mean(draws == 0) - p0) < 4 * math.sqrt(p0 * (1 - p0) / 200_000)
    assert np.max(np.abs(draws)) <= noise_bound(sigma)
    if sigma >= 1:
        assert var == pytest.approx(sigma**2, rel=1e-3)


def test_seeded_integer_noise_is_reproducible() -> None:
    a = SeededGaussianNoise(5).sample_integer((3, 4), 2.0)
    assert a.shape == (3, 4)
    assert np.array_equal(a, SeededGaussianNoise(5).sample_integer((3, 4), 2.0))


@pytest.mark.parametrize("sigma", [1.0, 7.5])
def test_opendp_integer_noise_scale(sigma: float) -> None:
    draws = OpenDPGaussianNoise().sample_integer((20_000,), sigma)
    var, _ = _discrete_gaussian_moments(sigma)
    assert draws.dtype == np.int64
    assert np.var(draws) == pytest.approx(var, rel=0.05)
    assert abs(np.mean(draws)) < 4 * math.sqrt(var / 20_000)
    assert np.max(np.abs(draws)) <= noise_bound(sigma)


@pytest.mark.parametrize("source", [SeededGaussianNoise(3), OpenDPGaussianNoise()],
                         ids=["seeded", "opendp"])
def test_truncation_redraws_beyond_the_bound(source: IntegerNoiseSource,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # at a 1σ bound the truncation is active on ~1/3 of the draws: none may pass it, and
    # the kept values keep the discrete Gaussian's relative frequencies
    monkeypatch.setattr(dg, "NOISE_BOUND_STDDEVS", 1)
    sigma = 3.0
    assert noise_bound(sigma) == 4
    draws = source.sample_integer((20_000,), sigma)
    assert np.max(np.abs(draws)) <= 4 and np.max(np.abs(draws)) == 4
    ratio = np.mean(np.abs(draws) == 4) / np.mean(draws == 0) / 2
    assert ratio == pytest.approx(math.exp(-16 / (2 * sigma**2)), rel=0.1)


def test_noise_bound() -> None:
    assert noise_bound(0.5) == 21 and noise_bound(3.0) == 121 and noise_bound(2.01) == 82
    with pytest.raises(ValueError):
        noise_bound(0.0)


def test_sum_of_site_noise_has_n_times_the_variance() -> None:
    source, sigma, n = SeededGaussianNoise(11), 2.5, 5
    total = np.sum([source.sample_integer((100_000,), sigma) for _ in range(n)], axis=0)
    assert np.var(total) == pytest.approx(n * sigma**2, rel=0.03)
    assert abs(np.mean(total)) < 4 * math.sqrt(n * sigma**2 / 100_000)


# --------------------------------------------------------------------------- release


def _release(values: np.ndarray, ledger: PrivacyLedger, noise: IntegerNoiseSource | None,
             rho: float = 0.1) -> np.ndarray:
    return release_distributed(values, sensitivity_l2=2.0 * 3 + math.sqrt(6), rho=rho,
                               n_summands=3, ledger=ledger, purpose="gram level 0",
                               assumption=ASSUMPTION, noise=noise)


def test_release_charges_first_and_records_the_assumption() -> None:
    ledger = PrivacyLedger.in_memory(1.0, "h1")
    values = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = _release(values, ledger, SeededGaussianNoise(0))
    assert out.dtype == np.int64 and out.shape == (2, 3)
    (entry,) = ledger.entries
    sigma = ddg_sigma(6 + math.sqrt(6), 0.1, 3, 6)
    assert entry.mechanism == DDG_MECHANISM and entry.rho == pytest.approx(0.1, rel=1e-9)
    assert entry.sigma == sigma and entry.dimension == 6
    assert entry.sensitivity_l2 == 6 + math.sqrt(6) and entry.assumption == ASSUMPTION
    assert entry.insecure_noise and not np.array_equal(out, values)
    assert np.max(np.abs(out - values)) <= noise_bound(sigma)
    recording = RecordingNoise()
    assert np.array_equal(_release(values, ledger, recording), values)  # values + its noise
    assert _release(values, PrivacyLedger.in_memory(1.0, "h2"), None).dtype == np.int64


def test_release_refused_at_budget_draws_nothing() -> None:
    ledger, noise = PrivacyLedger.in_memory(0.15, "h1"), RecordingNoise()
    _release(np.zeros(6, dtype=np.int64), ledger, noise)
    assert noise.calls == 1
    with pytest.raises(BudgetExceeded):
        _release(np.zeros(6, dtype=np.int64), ledger, noise)
    assert noise.calls == 1 and len(ledger.entries) == 1


def test_release_refuses_bad_input() -> None:
    ledger, noise = PrivacyLedger.in_memory(1.0, "h1"), RecordingNoise()
    with pytest.raises(TypeError, match="integers"):
        _release(np.zeros(3), ledger, noise)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        _release(np.array([2**62 + 1]), ledger, noise)
    with pytest.raises(ValueError, match="assumption"):
        release_distributed(np.zeros(2, dtype=np.int64), sensitivity_l2=1.0, rho=0.1,
                            n_summands=3, ledger=ledger, purpose="p", assumption=" ",
                            noise=noise)
    assert noise.calls == 0 and ledger.entries == ()


# --------------------------------------------------------------------------- ledger


def test_ledger_without_assumption_field_still_loads(tmp_path: Path) -> None:
    old_entry = {"mechanism": "gaussian", "sensitivity_l2": 1.0, "sigma": 2.0, "rho": 0.125,
                 "purpose": "counts", "time": "2026-11-30T10:00:00+00:00", "dimension": 3,
                 "noise_source": "gaussian-opendp-exact"}
    payload = {"format": "fediim-ledger/1", "site_id": "h1", "rho_budget": 1.0,
               "entries": [old_entry]}
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({**payload, "checksum": _checksum(payload)}))
    ledger = PrivacyLedger.open(path, 1.0, "h1")
    assert ledger.entries[0].assumption is None and ledger.spent_rho == 0.125
    _release(np.zeros(4, dtype=np.int64), ledger, RecordingNoise())
    reopened = PrivacyLedger.open(path, 1.0, "h1")
    assert [e.assumption for e in reopened.entries] == [None, ASSUMPTION]
    stored = json.loads(path.read_text())["entries"]
    assert stored[0] == old_entry and stored[1]["assumption"] == ASSUMPTION
