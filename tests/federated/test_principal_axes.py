"""The principal-axis frame under secure sums: the moments release (sensitivity on
neighbouring datasets, noise scale, charged first, refused at budget), the frame read off
it, the counts and Grams formed in it, and the bank's readers finding cells in it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from fediim import FederatedIIM
from fediim.federated.global_partition import GlobalTree, node_counts, prune_tree
from fediim.federated.gram import augmented_gram
from fediim.federated.plan import plan_privacy
from fediim.federated.principal import (
    FRAME_SPREAD,
    Frame,
    eigenvalue_floor,
    frame_from_moments,
    moments_upper,
)
from fediim.federated.secure_release import (
    QUANT_SCALE,
    SecureSettings,
    SecureSteps,
    SiteShares,
    count_sensitivity,
    default_threshold,
    gram_share_sensitivity,
    moments_sensitivity,
    moments_sum_sigma,
    plain_sum,
    secure_bank,
)
from fediim.federated.site_imputation import other_sites_bank
from fediim.privacy import BudgetExceeded, PrivacyLedger, SeededGaussianNoise
from fediim.privacy.distributed import DDG_MECHANISM
from fediim.protocol.secure_run import PublicState, decode_public_state, session_statistics
from tests.release_doubles import RecordingNoise

EXACT = SecureSteps(math.inf, math.inf, math.inf, True)
BOX = (np.full(3, -0.5), np.full(3, 0.5))


def _rows(n: int, seed: int = 0) -> np.ndarray:
    """A thin diagonal sheet, like ccpp's: the last column nearly a multiple of the first."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.12, (n, 3))
    x[:, 2] = -0.8 * x[:, 0] + rng.normal(0, 0.02, n)
    return np.clip(x, -0.5, 0.5)


def _shares(x: np.ndarray, plan, *, ledger=None, noise=None, site_id: str = "a") -> SiteShares:
    ledger = PrivacyLedger.in_memory(10.0, site_id) if ledger is None else ledger
    return SiteShares.from_table(x, np.tile([-0.5, 0.5], (3, 1)), plan,
                                 SecureSettings(3, default_threshold(3)), site_id=site_id,
                                 ledger=ledger, noise=noise)


def _frame(rows: np.ndarray) -> Frame:
    return frame_from_moments(moments_upper(rows).sum(axis=0), 3, np.zeros(3, bool), 0.0)


def test_the_plan_asks_for_moments_first_and_exact_plans_for_none() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    assert plan.principal_axes
    assert session_statistics(plan, np.ones(3, bool)) == ("moments", "counts", "grams")
    off = plan_privacy(1.0, 1e-6, 3, principal_axes=False)
    assert session_statistics(off, np.ones(3, bool))[0] == "histograms"
    assert session_statistics(plan_privacy(math.inf, 0.0, 3), np.ones(3, bool)) == (
        "counts", "grams")


# ---- sensitivity on neighbouring datasets --------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moments_counts_and_grams_in_a_frame_move_by_at_most_their_sensitivity(
        seed: int) -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    base = _rows(300, seed)
    # the data's own frame, and one that stretches a thin axis far beyond the records
    frames = [_frame(base), Frame(np.diag([40.0, 1.0, 0.3]) @ _frame(base).matrix,
                                  np.array([3.0, 0.0, -0.1]))]
    corners = np.array([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5], [0.5, -0.5, 0.5]])
    for frame in frames:
        z = frame.to_frame(base)
        tree = GlobalTree(BOX, 6, 0, prune_tree(node_counts(z, BOX, 6, 0).astype(float), 6,
                                                split_threshold=30, min_records=3))
        for extra in [*corners, np.random.default_rng(seed).uniform(-0.5, 0.5, 3)]:
            a, b = _shares(base, plan), _shares(np.vstack([base, extra]), plan)
            gaps = {
                "moments": (b.moments(EXACT) - a.moments(EXACT), moments_sensitivity(3)),
                "counts": (b.share("counts", EXACT, BOX, 6, (), frame)
                           - a.share("counts", EXACT, BOX, 6, (), frame),
                           count_sensitivity(6, 1)),
                "grams": (b.share("grams", EXACT, BOX, 6, [tree], frame)
                          - a.share("grams", EXACT, BOX, 6, [tree], frame),
                          gram_share_sensitivity(3, 1)),
            }
            for name, (gap, bound) in gaps.items():
                assert np.linalg.norm(gap.astype(float)) <= bound + 1e-9, name


def test_a_corner_record_nearly_fills_the_moments_bound() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    gap = (_shares(np.full((1, 3), 0.5), plan).moments(EXACT)
           - _shares(np.zeros((0, 3)), plan).moments(EXACT))
    assert np.linalg.norm(gap.astype(float)) >= 0.99 * (moments_sensitivity(3) - 3.0)


# ---- noise, ledger, refusal ------------------------------------------------------------------

def test_the_summed_moments_carry_the_planned_noise() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    steps = SecureSteps.from_plan(plan)
    settings = SecureSettings(3, default_threshold(3))
    totals = []
    for repeat in range(40):  # three empty sites: each share is its noise only
        shares = {str(n): _shares(np.zeros((0, 3)), plan, site_id=str(n),
                                  noise=SeededGaussianNoise(100 * repeat + n)).moments(steps)
                  for n in range(3)}
        totals.append(plain_sum("moments", shares)[0])
    expected = moments_sum_sigma(steps, settings, 3, 3)
    assert np.std(np.concatenate(totals)) == pytest.approx(expected, rel=0.08)


def test_moments_are_charged_first_and_the_plan_is_spent_exactly() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    sites = {f"s{n}": _shares(_rows(400, n), plan, site_id=f"s{n}",
                              ledger=PrivacyLedger.in_memory(plan.rho_total, f"s{n}"),
                              noise=SeededGaussianNoise(n)) for n in range(3)}
    bank = secure_bank(sites, plan, SecureSettings(3, 2))
    for site in sites.values():
        entries = site.ledger.entries
        assert [e.mechanism for e in entries] == [DDG_MECHANISM] * 3
        assert "moments" in entries[0].purpose
        assert entries[0].rho == pytest.approx(plan.rho_clip, rel=1e-9)
        assert entries[0].sensitivity_l2 == pytest.approx(moments_sensitivity(3))
        assert site.ledger.spent_rho == pytest.approx(plan.rho_total, rel=1e-9)
    assert bank.frame is not None


def test_moments_refused_at_budget_draw_no_noise() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    steps = SecureSteps.from_plan(plan)
    ledger, noise = PrivacyLedger.in_memory(plan.rho_total, "a"), RecordingNoise()
    site = _shares(_rows(100), plan, ledger=ledger, noise=noise)
    ledger.charge(mechanism="gaussian", sensitivity_l2=1.0, sigma=1.0,
                  rho=plan.rho_total - steps.rho_histograms / 2, purpose="earlier",
                  dimension=1, noise_source="test")
    with pytest.raises(BudgetExceeded):
        site.moments(steps)
    assert noise.calls == 0


# ---- the frame ---------------------------------------------------------------------------------

def test_the_frame_whitens_exact_moments_to_its_box() -> None:
    rows = _rows(5000)
    z = _frame(rows).to_frame(rows)
    covariance = np.cov(z.T)
    assert np.allclose(covariance, np.eye(3) / (2 * FRAME_SPREAD) ** 2, atol=2e-3)
    assert np.allclose(z.mean(axis=0), 0.0, atol=1e-3)


def test_a_noisy_thin_axis_keeps_a_box_as_wide_as_the_noise_floor() -> None:
    rows = _rows(2000)
    upper = moments_upper(rows).sum(axis=0)
    upper[-1] -= 0.9 * upper[-1]  # the thin axis' variance driven below zero by "noise"
    sigma = 5.0
    frame = frame_from_moments(upper, 3, np.zeros(3, bool), sigma)
    floor = eigenvalue_floor(sigma, 2000, 3)
    half_widths = 1.0 / (2.0 * np.linalg.norm(frame.matrix, axis=1))
    assert np.all(np.isfinite(frame.matrix))
    assert half_widths.min() >= FRAME_SPREAD * math.sqrt(floor) * 0.999


def test_grams_formed_in_a_frame_map_back_exactly() -> None:
    rows = _rows(500)
    frame = _frame(rows)
    inside = rows[np.all(np.abs(rows @ frame.matrix.T + frame.offset) < 0.5, axis=1)]
    back = frame.gram_back(augmented_gram(frame.to_frame(inside)))
    assert np.allclose(back, augmented_gram(inside), atol=1e-9)
    assert np.allclose(frame.from_frame(frame.to_frame(inside)), inside)


def test_coded_columns_keep_the_public_coordinates() -> None:
    rows = np.column_stack([_rows(300), np.random.default_rng(0).integers(0, 2, 300) * 0.5])
    upper = moments_upper(rows).sum(axis=0)
    frame = frame_from_moments(upper, 4, np.array([False, False, False, True]), 0.0)
    assert np.array_equal(frame.matrix[3], [0, 0, 0, 1])
    assert np.array_equal(frame.matrix[:, 3], [0, 0, 0, 1]) and frame.offset[3] == 0


def test_the_public_state_carries_the_frame_exactly() -> None:
    frame = _frame(_rows(300))
    state = PublicState(BOX, 4, frame=frame)
    back = decode_public_state(state.encode(), 3, 1)
    assert back.frame is not None
    assert np.array_equal(back.frame.matrix, frame.matrix)
    assert np.array_equal(back.frame.offset, frame.offset)
    assert decode_public_state(PublicState(BOX, 4).encode(), 3, 1).frame is None
    with pytest.raises(ValueError):
        decode_public_state(PublicState(BOX, 4, frame=Frame(np.eye(2), np.zeros(2)))
                            .encode(), 3, 1)


# ---- the estimator -------------------------------------------------------------------------------

def _federation() -> list[np.ndarray]:
    tables = [_rows(n, n) * 10 for n in (900, 700, 500, 300)]
    for table in tables:
        table[::7, 1] = np.nan
    return tables


def test_a_site_finds_its_rows_cells_in_the_frame() -> None:
    tables = _federation()
    model = FederatedIIM(epsilon=1e6, delta=1e-6, aggregation="secure", seed=0,
                         bounds=np.tile([-5.0, 5.0], (3, 1))).fit(tables)
    bank = model.bank_
    assert bank.frame is not None
    others = other_sites_bank(bank, "site0", tables[0] / 10.0)
    complete = tables[0][~np.isnan(tables[0]).any(axis=1)] / 10.0
    z = bank.frame.to_frame(complete)  # the kept cells' boxes hold these rows
    held = ((z[:, None] >= bank.lo[None]) & (z[:, None] <= bank.hi[None])).all(axis=2)
    assert held.any(axis=1).sum() > 0.8 * len(complete)
    assert bank.counts.sum() - others.counts.sum() == pytest.approx(
        held.any(axis=1).sum(), abs=0.5)
    assert others.frame is not None


def test_axis_aligned_when_asked() -> None:
    tables = _federation()
    bounds = np.tile([-5.0, 5.0], (3, 1))
    on = FederatedIIM(epsilon=2.0, aggregation="secure", seed=1, bounds=bounds).fit(tables)
    off = FederatedIIM(epsilon=2.0, aggregation="secure", seed=1, bounds=bounds,
                       principal_axes=False).fit(tables)
    assert on.bank_.frame is not None and off.bank_.frame is None
    assert "frame" not in dataclasses.asdict(off.plan_) or not off.plan_.principal_axes
    for model in (on, off):
        assert all(not np.isnan(t).any() for t in model.transform(tables))


def test_the_quantised_moments_hold_each_records_gram() -> None:
    rows = _rows(50)
    plan = plan_privacy(1.0, 1e-6, 3)
    got = _shares(rows, plan).moments(EXACT) / QUANT_SCALE
    assert np.allclose(got, moments_upper(rows).sum(axis=0), atol=50 / QUANT_SCALE)
