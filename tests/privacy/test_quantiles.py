"""Private quantiles: OpenDP's score and its sensitivity, the mechanism's noise scale and
privacy map, the ledger charge and the refusal at budget."""

from __future__ import annotations

import math

import numpy as np
import opendp.prelude as dp
import pytest
from scipy.stats import chisquare

from fediim.privacy import (
    BudgetExceeded,
    NoiseSource,
    OpenDPGaussianNoise,
    PrivacyLedger,
    QuantileNoiseSource,
    SeededGaussianNoise,
    quantile_candidates,
    quantile_score_scale,
    quantile_score_sensitivity,
    release_quantiles,
)
from fediim.privacy.mechanisms import (
    private_quantile_measurement,
    quantile_score_denominator,
    quantile_scores,
)
from tests.release_doubles import RecordingNoise

dp.enable_features("contrib")

ALPHAS = (0.05, 0.25, 0.5, 0.9, 0.95, 0.3)


class RecordingQuantileNoise(RecordingNoise):
    """A quantile source that counts draws (a refused release must draw nothing)."""

    quantile_mechanism = "recording-quantile-stub"

    def quantile(self, values: np.ndarray, candidates: np.ndarray, alpha: float,
                 scale: float) -> float:
        self.calls += 1
        return float(candidates[0])


def _reference_scores(x: np.ndarray, cands: np.ndarray, alpha: float) -> np.ndarray:
    """Smith's quantile score in records, |#(x < c) − α·(n − #(x = c))| (what OpenDP's
    integer score is, times den)."""
    lt = (x[:, None] < cands[None, :]).sum(axis=0)
    eq = (x[:, None] == cands[None, :]).sum(axis=0)
    return np.abs(lt - alpha * (len(x) - eq))


def _softmin(scores: np.ndarray, scale: float) -> np.ndarray:
    w = np.exp(-(scores - scores.min()) / scale)
    return w / w.sum()


# --------------------------------------------------------------------------- the score


@pytest.mark.parametrize("alpha", ALPHAS)
def test_scores_are_smiths_score(alpha: float) -> None:
    rng = np.random.default_rng(1)
    cands = np.linspace(0.0, 1.0, 11)
    x = np.concatenate([rng.uniform(0, 1, 30), cands[[2, 2, 5]]])  # ties with candidates
    den = quantile_score_denominator(alpha)
    got = quantile_scores(x, cands, alpha) / den
    assert np.abs(got - _reference_scores(x, cands, alpha)).max() < 1e-3  # α rounded to 1e-4


@pytest.mark.parametrize("alpha", ALPHAS)
def test_score_sensitivity_brute_force_add_remove(alpha: float) -> None:
    """Adding or removing one record moves no candidate's score by more than the declared
    sensitivity (in records), and some neighbour attains it."""
    rng = np.random.default_rng(7)
    cands = np.linspace(-0.5, 0.5, 9)
    den = quantile_score_denominator(alpha)
    declared = quantile_score_sensitivity(alpha)
    worst = 0.0
    for _ in range(40):
        x = np.round(rng.uniform(-0.6, 0.6, rng.integers(0, 12)), 1)  # ties and outliers
        base = quantile_scores(x, cands, alpha)
        neighbours = [np.delete(x, i) for i in range(len(x))]
        neighbours += [np.append(x, v) for v in (*cands[[0, 4, 8]], -0.9, 0.05, 0.9)]
        for y in neighbours:
            worst = max(worst, np.abs(quantile_scores(y, cands, alpha) - base).max() / den)
    assert worst <= declared + 1e-12
    assert worst == pytest.approx(declared)
    assert declared == pytest.approx(max(alpha, 1 - alpha), abs=1e-4)


# --------------------------------------------------------------------------- privacy map


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("rho", [1e-4, 0.01, 0.5])
def test_scale_gives_rho_by_opendp_map(alpha: float, rho: float) -> None:
    scale = quantile_score_scale(alpha, rho)
    assert scale == pytest.approx(quantile_score_sensitivity(alpha) / math.sqrt(2 * rho))
    meas = private_quantile_measurement(tuple(np.linspace(0, 1, 5)), alpha, scale)
    assert meas.map(1) == pytest.approx(rho, rel=1e-9)  # d_in = 1: one record added/removed
    assert meas.map(2) == pytest.approx(4 * rho, rel=1e-9)  # a changed record: two steps


def test_sources_implement_the_protocols() -> None:
    for src in (OpenDPGaussianNoise(), SeededGaussianNoise(0)):
        assert isinstance(src, QuantileNoiseSource) and isinstance(src, NoiseSource)
    assert isinstance(RecordingNoise(), NoiseSource)  # Gaussian-only sources keep working
    assert not isinstance(RecordingNoise(), QuantileNoiseSource)


# --------------------------------------------------------------------------- noise scale


def test_seeded_select_min_is_the_exponential_mechanism() -> None:
    scores, scale = np.array([0.0, 1.0, 2.5, 4.0]), 1.5
    src = SeededGaussianNoise(11)
    draws = np.array([src.select_min(scores, scale) for _ in range(20_000)])
    observed = np.bincount(draws, minlength=4)
    expected = _softmin(scores, scale) * len(draws)
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("source", [SeededGaussianNoise(5), OpenDPGaussianNoise()],
                         ids=["seeded", "opendp"])
def test_quantile_distribution_matches_opendp_mechanism(source: QuantileNoiseSource) -> None:
    """Both sources draw candidate i with probability ∝ exp(−score_i / scale) (scores in
    records): the seeded simulation is the same mechanism as OpenDP's, at the same scale."""
    cands = np.array([0.0, 1.0, 2.0, 3.0])
    values = np.array([0.5, 1.5, 1.7, 2.2, 2.9, 0.2])
    alpha, scale = 0.25, 0.8
    draws = [source.quantile(values, cands, alpha, scale) for _ in range(6000)]
    observed = np.array([np.sum(np.asarray(draws) == c) for c in cands])
    probs = _softmin(_reference_scores(values, cands, alpha), scale)
    assert observed.sum() == len(draws)  # every draw is a candidate
    assert chisquare(observed, probs * len(draws)).pvalue > 1e-4


# --------------------------------------------------------------------------- release


def test_release_charges_once_before_drawing() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.1, (400, 3))
    x[::5, 1] = np.nan
    ledger = PrivacyLedger.in_memory(1.0, "s")
    out = release_quantiles(x, -0.5, 0.5, (0.05, 0.95), rho=0.3, ledger=ledger,
                            purpose="clip", noise=SeededGaussianNoise(1))
    assert out.shape == (3, 2)
    (entry,) = ledger.entries
    assert entry.mechanism == SeededGaussianNoise.quantile_mechanism
    assert entry.noise_source == SeededGaussianNoise.name and entry.insecure_noise
    assert entry.rho == pytest.approx(0.3, rel=1e-9) and entry.dimension == 6
    assert entry.sensitivity_l2 == pytest.approx(0.95)
    assert entry.sigma == pytest.approx(quantile_score_scale(0.05, 0.3 / 6))
    assert entry.purpose == "clip"
    grid = quantile_candidates(-0.5, 0.5)
    assert np.all(np.isin(out, grid))  # every output is a public candidate


def test_release_refused_at_budget_draws_nothing() -> None:
    ledger = PrivacyLedger.in_memory(0.1, "s")
    ledger.charge(mechanism="gaussian", sensitivity_l2=1.0, sigma=1.0, rho=0.08,
                  purpose="earlier", dimension=1, noise_source="recording-stub")
    src = RecordingQuantileNoise()
    with pytest.raises(BudgetExceeded):
        release_quantiles(np.zeros((50, 2)), -1.0, 1.0, (0.1, 0.9), rho=0.05,
                          ledger=ledger, purpose="clip", noise=src)
    assert src.calls == 0
    assert len(ledger.entries) == 1 and ledger.spent_rho == pytest.approx(0.08)
    release_quantiles(np.zeros((50, 2)), -1.0, 1.0, (0.1, 0.9), rho=0.02, ledger=ledger,
                      purpose="clip", noise=src)
    assert src.calls == 4  # within budget: one draw per (column, alpha)


def test_release_opendp_source_is_accurate_and_inside_bounds() -> None:
    x = np.random.default_rng(3).uniform(2.0, 6.0, 3000)
    ledger = PrivacyLedger.in_memory(10.0, "s")
    out = release_quantiles(x, 0.0, 10.0, (0.1, 0.5, 0.9), rho=5.0, ledger=ledger,
                            purpose="q")
    assert out.shape == (3,)
    assert ledger.entries[0].noise_source == OpenDPGaussianNoise.name
    assert not ledger.entries[0].insecure_noise
    step = 10.0 / 255
    np.testing.assert_allclose(out, np.quantile(x, [0.1, 0.5, 0.9]), atol=3 * step)


def test_release_skips_nan_and_clamps_to_public_bounds() -> None:
    rng = np.random.default_rng(4)
    col = rng.uniform(-0.3, 0.3, 200)
    with_nan = np.concatenate([col, np.full(50, np.nan)])
    outside = np.concatenate([col, [-7.0, 9.0]])  # clamped to the bounds, still counted
    kw = {"rho": 0.5, "purpose": "q"}
    a = release_quantiles(col, -0.5, 0.5, (0.2, 0.8), ledger=PrivacyLedger.in_memory(1, "s"),
                          noise=SeededGaussianNoise(9), **kw)
    b = release_quantiles(with_nan, -0.5, 0.5, (0.2, 0.8), noise=SeededGaussianNoise(9),
                          ledger=PrivacyLedger.in_memory(1, "s"), **kw)
    c = release_quantiles(outside, -0.5, 0.5, (0.2, 0.8), noise=SeededGaussianNoise(9),
                          ledger=PrivacyLedger.in_memory(1, "s"), **kw)
    np.testing.assert_array_equal(a, b)
    assert np.all((c >= -0.5) & (c <= 0.5))


def test_release_is_reproducible_with_a_seed() -> None:
    x = np.random.default_rng(5).normal(0, 0.1, (100, 2))

    def run(seed: int) -> np.ndarray:
        return release_quantiles(x, -0.5, 0.5, (0.05, 0.95), rho=0.01, purpose="q",
                                 ledger=PrivacyLedger.in_memory(1, "s"),
                                 noise=SeededGaussianNoise(seed))

    np.testing.assert_array_equal(run(1), run(1))
    assert any(not np.array_equal(run(1), run(s)) for s in range(2, 6))


@pytest.mark.parametrize("bad", [
    {"alphas": ()}, {"alphas": (1.5,)}, {"rho": 0.0}, {"rho": math.inf},
    {"public_lo": 1.0}, {"grid_size": 1},
])
def test_release_rejects_bad_arguments_without_charging(bad: dict) -> None:
    kw = {"public_lo": -0.5, "public_hi": 0.5, "alphas": (0.5,), "rho": 0.1,
          "grid_size": 16, **bad}
    ledger = PrivacyLedger.in_memory(1.0, "s")
    with pytest.raises(ValueError):
        release_quantiles(np.zeros(10), kw.pop("public_lo"), kw.pop("public_hi"),
                          kw.pop("alphas"), ledger=ledger, purpose="q", **kw)
    assert ledger.entries == ()
