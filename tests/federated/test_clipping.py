"""Private clipping boxes: inside the public bounds, never degenerate, charged once (or not
at all when exact), refused at budget, reproducible with a seeded source."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fediim.federated.clipping import (
    CLIP_MARGIN,
    CLIP_MIN_WIDTH,
    CLIP_QUANTILES,
    clamp_to_box,
    clip_min_records,
    exact_clip_quantiles,
    private_clip_box,
    widen_box,
)
from fediim.privacy import (
    BudgetExceeded,
    PrivacyLedger,
    SeededGaussianNoise,
    quantile_score_scale,
    quantile_score_sensitivity,
)
from fediim.privacy.mechanisms import quantile_score_denominator, quantile_scores


def _site(n: int = 300, seed: int = 0) -> np.ndarray:
    """A scaled site: a narrow normal column, a wide one with NaN, a binary and a constant
    column (the hard cases for a box)."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(0.1, 0.03, n), rng.uniform(-0.4, 0.3, n),
                         rng.integers(0, 2, n) - 0.5, np.full(n, 0.2)])
    x[rng.random(n) < 0.3, 1] = np.nan
    return x


def _assert_valid_box(lo: np.ndarray, hi: np.ndarray, min_width: float = CLIP_MIN_WIDTH
                      ) -> None:
    assert np.all(lo >= -0.5) and np.all(hi <= 0.5) and np.all(lo < hi)
    assert np.all(hi - lo >= min_width - 1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-2, 2), st.floats(-2, 2)), min_size=1, max_size=6),
       st.floats(0, 3), st.floats(1e-3, 1))
def test_widen_box_always_valid(pairs: list[tuple[float, float]], margin: float,
                                min_width: float) -> None:
    q = np.array(pairs)
    lo, hi = widen_box(q[:, 0], q[:, 1], margin=margin, min_width=min_width)
    _assert_valid_box(lo, hi, min_width)
    inside = np.clip(np.sort(q, axis=1), -0.5, 0.5)
    assert np.all(lo <= inside[:, 0] + 1e-12) and np.all(hi >= inside[:, 1] - 1e-12)


def test_exact_box_is_widened_quantiles_without_charge() -> None:
    x = _site()
    ledger = PrivacyLedger.in_memory(1.0, "s")
    lo, hi = private_clip_box(x, math.inf, ledger=ledger)
    assert ledger.entries == ()
    q = exact_clip_quantiles(x, CLIP_QUANTILES)
    want_lo, want_hi = widen_box(q[:, 0], q[:, 1], margin=CLIP_MARGIN)
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(hi, want_hi)
    col = x[:, 0]
    spread = np.quantile(col, 0.95) - np.quantile(col, 0.05)
    assert lo[0] == pytest.approx(np.quantile(col, 0.05) - CLIP_MARGIN * spread)
    assert (lo[2], hi[2]) == (-0.5, 0.5)  # a binary column keeps its whole range
    assert hi[3] - lo[3] == pytest.approx(CLIP_MIN_WIDTH)  # a constant column is not thin
    assert lo[3] < 0.2 < hi[3]
    _assert_valid_box(lo, hi)
    assert private_clip_box(x, math.inf, ledger=None)[0].shape == (4,)  # no ledger needed


def test_private_box_charges_once_and_is_valid() -> None:
    x = _site(2000)
    ledger = PrivacyLedger.in_memory(1.0, "s")
    lo, hi = private_clip_box(x, 0.4, ledger=ledger, noise=SeededGaussianNoise(3))
    _assert_valid_box(lo, hi)
    (entry,) = ledger.entries
    assert entry.rho == pytest.approx(0.4, rel=1e-9) and entry.dimension == 8
    assert entry.mechanism == SeededGaussianNoise.quantile_mechanism
    assert entry.purpose == "clipping bounds"
    assert hi[0] - lo[0] < 0.5  # the narrow column gets a narrow box
    _, moved = clamp_to_box(x, lo, hi)
    assert moved[0] <= 0.02 * len(x)


def test_private_box_reproducible_with_seed() -> None:
    x = _site()

    def box(seed: int) -> tuple[np.ndarray, np.ndarray]:
        return private_clip_box(x, 0.05, ledger=PrivacyLedger.in_memory(1.0, "s"),
                                noise=SeededGaussianNoise(seed))

    for a, b in zip(box(4), box(4), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(box(4)[0], box(s)[0]) for s in range(5, 9))


def test_private_box_refused_at_budget_charges_and_draws_nothing() -> None:
    ledger = PrivacyLedger.in_memory(0.1, "s")
    src = SeededGaussianNoise(0)
    state = src._rng.bit_generator.state
    with pytest.raises(BudgetExceeded):
        private_clip_box(_site(), 0.2, ledger=ledger, noise=src)
    assert ledger.entries == ()
    assert src._rng.bit_generator.state == state  # no random number was drawn


def test_unclipped_columns_keep_public_bounds_and_get_no_budget() -> None:
    x = _site()
    ledger = PrivacyLedger.in_memory(1.0, "s")
    flags = [True, True, False, False]
    lo, hi = private_clip_box(x, 0.2, ledger=ledger, noise=SeededGaussianNoise(1),
                              clip_columns=flags)
    assert list(lo[2:]) == [-0.5, -0.5] and list(hi[2:]) == [0.5, 0.5]
    (entry,) = ledger.entries
    assert entry.dimension == 4  # 2 columns x 2 quantiles share the whole 0.2
    assert entry.sigma == pytest.approx(quantile_score_scale(0.05, 0.2 / 4))
    none = PrivacyLedger.in_memory(1.0, "s")
    lo, hi = private_clip_box(x, 0.2, ledger=none, clip_columns=[False] * 4)
    assert none.entries == () and np.all(lo == -0.5) and np.all(hi == 0.5)
    with pytest.raises(ValueError):
        private_clip_box(x, 0.2, ledger=none, clip_columns=[True])
    with pytest.raises(ValueError):
        private_clip_box(x, 0.2, ledger=None)


def test_neighbouring_sites_move_each_columns_scores_by_at_most_the_sensitivity() -> None:
    """A record (row) added or removed changes each column's observed records by at most
    one (NaN cells drop out), so each of the m·k releases sees a neighbouring dataset and
    their ρ's add: the charge of one call."""
    rng = np.random.default_rng(2)
    grid = np.linspace(-0.5, 0.5, 17)
    for alpha in CLIP_QUANTILES:
        den, declared = quantile_score_denominator(alpha), quantile_score_sensitivity(alpha)
        for _ in range(10):
            x = np.round(_site(20, int(rng.integers(1000))), 2)
            for y in (x[1:], np.vstack([x, x[:1] + 0.01]), np.vstack([x, [[np.nan] * 4]])):
                for j in range(x.shape[1]):
                    a, b = x[~np.isnan(x[:, j]), j], y[~np.isnan(y[:, j]), j]
                    assert abs(len(a) - len(b)) <= 1
                    diff = quantile_scores(a, grid, alpha) - quantile_scores(b, grid, alpha)
                    assert np.abs(diff).max() / den <= declared + 1e-12


def test_clamp_to_box_counts_and_keeps_nan() -> None:
    x = np.array([[-0.4, np.nan], [0.0, 0.3], [0.45, -0.2]])
    out, moved = clamp_to_box(x, np.array([-0.3, -0.1]), np.array([0.3, 0.2]))
    np.testing.assert_array_equal(moved, [2, 2])
    assert np.isnan(out[0, 1])
    np.testing.assert_allclose(out[:, 0], [-0.3, 0.0, 0.3])


def test_clip_min_records() -> None:
    assert clip_min_records(math.inf, 5) == 1.0
    small, big = clip_min_records(0.001, 5), clip_min_records(0.01, 5)
    assert small > big > 0
    assert clip_min_records(0.01, 10) == pytest.approx(big * math.sqrt(2))
