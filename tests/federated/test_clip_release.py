"""The clipping box inside a site's release: charged in the ledger before anything is
drawn, skipped (quantiles uncharged) where it cannot pay, absent for exact statistics;
records clamped to it, cells inside it, and the box carried by the bank and checked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fediim.errors import BankError
from fediim.federated import site_imputation
from fediim.federated.bank import ModelBank
from fediim.federated.clipping import clip_min_records
from fediim.federated.plan import plan_privacy, scale_to_bounds
from fediim.federated.release import CLIP_COUNT_SHARE, site_release
from fediim.federated.vetting import ReleaseLimits, release_problems
from fediim.privacy import PrivacyLedger, SeededGaussianNoise
from tests.federated.spies import spy_bank_counts

M = 3
DELTA = 1e-6
# Generous public bounds: the data fill about a fifth of each range.
BOUNDS = np.array([[-50.0, 50.0], [-50.0, 50.0], [-50.0, 50.0]])


def _site(n: int, seed: int = 0, outliers: int = 0) -> np.ndarray:
    """Correlated records near the middle of the bounds; ``outliers`` rows far out."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 1))
    x = 5.0 * z * np.array([1.0, 0.8, -0.6]) + rng.normal(size=(n, M))
    x[:outliers] = rng.uniform(35.0, 49.0, size=(outliers, M))
    return x


def _release(x: np.ndarray, epsilon: float, **plan_args: float
             ) -> tuple[ModelBank, PrivacyLedger, object]:
    plan = plan_privacy(epsilon, DELTA, M, max_depth=4, **plan_args)
    ledger = PrivacyLedger.in_memory(plan.rho_total, "s") if math.isfinite(
        plan.rho_total) else None
    bank = site_release(x, BOUNDS, plan, site_id="s", ledger=ledger,
                        noise=SeededGaussianNoise(0))
    return bank, ledger, plan


def test_a_large_site_charges_its_box_before_the_tree_and_clamps_to_it() -> None:
    bank, ledger, plan = _release(_site(4000, outliers=20), 4.0)
    count, quantiles, *rest = ledger.entries
    assert "record count" in count.purpose and count.sensitivity_l2 == 1.0
    assert count.rho == pytest.approx(CLIP_COUNT_SHARE * plan.rho_clip, rel=1e-9)
    assert "quantiles" in quantiles.purpose
    assert quantiles.rho == pytest.approx((1 - CLIP_COUNT_SHARE) * plan.rho_clip, rel=1e-9)
    assert all("partition counts" in e.purpose or "Gram" in e.purpose for e in rest)
    assert ledger.spent_rho <= plan.rho_total * (1 + 1e-12)
    box_lo, box_hi = bank.clip_lo[0], bank.clip_hi[0]
    assert np.all(bank.clip_lo == box_lo) and np.all(bank.clip_hi == box_hi)
    # Much narrower than the public bounds, yet every cell lies inside it.
    assert np.all(box_hi - box_lo < 0.6)
    assert np.all(bank.lo >= box_lo - 1e-12) and np.all(bank.hi <= box_hi + 1e-12)
    # The outliers were clamped, not dropped: the cells still describe every record.
    assert bank.counts.sum() == pytest.approx(4000, abs=6 * plan.sigma_gram * bank.n_cells)
    assert release_problems(bank, ReleaseLimits.from_plan(plan, M)) == []


def test_a_small_site_spends_only_the_count_and_keeps_the_public_bounds() -> None:
    plan = plan_privacy(1.0, DELTA, M, max_depth=4)
    assert clip_min_records((1 - CLIP_COUNT_SHARE) * plan.rho_clip, M) > 300
    bank, ledger, _ = _release(_site(150), 1.0)
    clip = [e for e in ledger.entries
            if "partition" not in e.purpose and "Gram" not in e.purpose]
    assert [e.purpose for e in clip] == ["record count (does a clipping box pay?)"]
    assert np.all(bank.clip_lo == -0.5) and np.all(bank.clip_hi == 0.5)


@pytest.mark.parametrize("plan_args", [{"clip_fraction": 0.0}, {}])
def test_no_box_without_budget_for_it_or_with_exact_statistics(plan_args: dict) -> None:
    epsilon = 4.0 if plan_args else math.inf
    bank, ledger, plan = _release(_site(4000), epsilon, **plan_args)
    assert plan.rho_clip == 0.0
    assert np.all(bank.clip_lo == -0.5) and np.all(bank.clip_hi == 0.5)
    if ledger is not None:
        assert not any("clip" in e.purpose or "record count" in e.purpose
                       for e in ledger.entries)


def test_unclipped_columns_keep_the_public_bounds_and_get_no_budget() -> None:
    plan = plan_privacy(4.0, DELTA, M, max_depth=4)
    ledger = PrivacyLedger.in_memory(plan.rho_total, "s")
    bank = site_release(_site(4000), BOUNDS, plan, site_id="s", ledger=ledger,
                        noise=SeededGaussianNoise(0), clip_columns=np.array([True, False,
                                                                               True]))
    assert bank.clip_lo[0, 1] == -0.5 and bank.clip_hi[0, 1] == 0.5
    assert bank.clip_hi[0, 0] - bank.clip_lo[0, 0] < 0.6
    quantiles = next(e for e in ledger.entries if "quantiles" in e.purpose)
    assert quantiles.dimension == 2 * 2  # two quantiles of two columns


@pytest.mark.parametrize("validation", ["shrinkage", "hybrid"])
def test_leave_own_rows_out_finds_clamped_rows_in_their_cells(
        monkeypatch: pytest.MonkeyPatch, validation: str) -> None:
    """Outliers were released clamped into the box: federated mode's shrinkage validation
    and the hybrid's bank side must subtract each from the cell that holds its clamped
    copy (nearly exact counts at eps = 50)."""
    x = _site(4000, outliers=40)
    bank, _, _ = _release(x, 50.0)
    assert np.all(bank.clip_hi < 0.4)  # the outliers (scaled > 0.35) lie outside the box
    seen = spy_bank_counts(monkeypatch)
    scaled, _ = scale_to_bounds(x, BOUNDS)
    configs = [site_imputation.BankConfig()]
    if validation == "shrinkage":
        site_imputation.leave_own_rows_out_predictions(
            bank, np.arange(bank.n_cells), scaled, 0, (1, 2), configs, 0)
    else:
        site_imputation.crossfitted_bank_coefficients(bank, "s", scaled, 0, (1, 2), configs)
    removed = np.sum([bank.counts - counts for counts in seen], axis=0)
    np.testing.assert_allclose(removed, bank.counts, atol=1.0)


def test_bank_keeps_the_box_through_bytes_and_vetting_checks_it() -> None:
    bank, _, plan = _release(_site(4000), 4.0)
    again = ModelBank.from_bytes(bank.to_bytes())
    np.testing.assert_array_equal(again.clip_lo, bank.clip_lo)
    np.testing.assert_array_equal(again.clip_hi, bank.clip_hi)
    limits = ReleaseLimits.from_plan(plan, M)
    shifted = ModelBank.from_bytes(bank.to_bytes())
    shifted.clip_hi[0] = shifted.clip_hi[0] - 0.01  # two different boxes in one release
    assert any("clipping boxes" in p for p in release_problems(shifted, limits))
    narrow = ModelBank.from_bytes(bank.to_bytes())
    narrow.clip_hi[:] = narrow.lo.max(axis=0)  # cells reach outside the box
    assert any("clipping box" in p for p in release_problems(narrow, limits))
    with pytest.raises(BankError, match="clip_lo"):
        ModelBank(n_features=M, site=bank.site, cell=bank.cell, lo=bank.lo, hi=bank.hi,
                  gram=bank.gram, sigma=bank.sigma, clip_lo=bank.clip_lo[:, :2])


def test_federated_mode_shrinks_towards_the_sites_own_mean_where_it_has_one() -> None:
    """The site's exact mean where it observes the target; the bank's (noisy) mean for a
    column it never measures."""
    x = _site(400) + np.array([10.0, 0.0, 0.0])  # this site sits apart from the bank
    x[:, 2] = np.nan  # never measures column 2
    bank, _, _ = _release(_site(4000, seed=1), 1.0)
    site = site_imputation.SiteView.build(
        x, bank, BOUNDS, mode="federated", n_neighbors=10, site_id="other",
        config=site_imputation.BankConfig(), blend_weights=site_imputation.BLEND_WEIGHTS,
        random_state=0)
    scaled, _ = scale_to_bounds(x, BOUNDS)
    jobs = {job.target: job for job in site_imputation.imputation_jobs(
        np.isnan(x) | (np.arange(400) < 20)[:, None] & (np.arange(M) == 0), 400, 0)}
    assert site_imputation.shrink_target(site, jobs[0]) == pytest.approx(
        scaled[jobs[0].train, 0].mean())
    assert site_imputation.shrink_target(site, jobs[2]) == pytest.approx(
        site.federation_mean[2])
    assert abs(site.federation_mean[0] - scaled[20:, 0].mean()) > 0.05
