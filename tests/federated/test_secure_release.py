"""Secure aggregation in the engine: the shared tree, each sum's sensitivity on
neighbouring datasets, its noise scale, the ledger charged first, the refusal at budget,
and the bank a site reads with its own rows left out."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fediim import FederatedIIM
from fediim.federated.global_partition import (
    GlobalTree,
    leaf_boxes,
    leaf_of_rows,
    n_nodes,
    node_counts,
    prune_tree,
    tree_problem,
)
from fediim.federated.plan import plan_privacy
from fediim.federated.secure_release import (
    QUANT_SCALE,
    SECURE_SITE,
    SecureSettings,
    SecureSteps,
    SiteShares,
    count_sensitivity,
    default_threshold,
    gram_share_sensitivity,
    histogram_sensitivity,
    plain_sum,
    secure_bank,
)
from fediim.federated.site_imputation import other_sites_bank, own_cells
from fediim.privacy import (
    BudgetExceeded,
    PrivacyLedger,
    SeededGaussianNoise,
    gram_sensitivity,
)
from fediim.privacy.distributed import DDG_MECHANISM, ddg_sigma
from tests.release_doubles import RecordingNoise

BOX = (np.full(3, -0.5), np.full(3, 0.5))
EXACT = SecureSteps(math.inf, math.inf, math.inf)


def _rows(n: int, seed: int = 0, m: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.12, (n, m))
    x[:, -1] = 0.6 * x[:, 0] + rng.normal(0, 0.03, n)
    return np.clip(x, -0.5, 0.5)


def _bounds(m: int = 3) -> np.ndarray:
    return np.tile([-0.5, 0.5], (m, 1))


def _shares(x: np.ndarray, plan, *, ledger=None, noise=None, n_sites: int = 3,
            site_id: str = "a") -> SiteShares:
    ledger = PrivacyLedger.in_memory(10.0, site_id) if ledger is None else ledger
    settings = SecureSettings(n_sites, default_threshold(n_sites))
    return SiteShares.from_table(x, _bounds(x.shape[1]), plan, settings, site_id=site_id,
                                 ledger=ledger, noise=noise)


# ---- the shared tree ----------------------------------------------------------------------

@pytest.mark.parametrize("tree", [0, 1, 2])
def test_every_row_falls_in_exactly_one_leaf_inside_its_box(tree: int) -> None:
    rows = _rows(2000)
    counts = node_counts(rows, BOX, 8, tree).astype(float)
    leaves = prune_tree(counts, 8, split_threshold=60, min_records=5)
    shared = GlobalTree(BOX, 8, tree, leaves)
    position = leaf_of_rows(rows, shared)
    lo, hi = shared.boxes()
    assert np.all((rows >= lo[position]) & (rows <= hi[position]))
    inside = ((rows[:, None, :] >= lo[None]) & (rows[:, None, :] < hi[None])).all(axis=2)
    # strictly inside at most one box (boundaries go up, as the descent sends them)
    assert inside.sum(axis=1).max() <= 1
    assert len(leaves) > 8


def test_node_counts_add_up_per_depth() -> None:
    rows = _rows(500)
    counts = node_counts(rows, BOX, 6, 0)
    for depth in range(7):
        assert counts[2**depth - 1: 2 ** (depth + 1) - 1].sum() == 500
    lo, hi = leaf_boxes(BOX, 0, np.arange(n_nodes(6)))  # every node's box
    assert np.allclose(lo[0], -0.5) and np.allclose(hi[0], 0.5)
    assert np.all(lo[1:] < hi[1:])


@pytest.mark.parametrize("leaves, ok", [
    ([1, 5, 6], True), ([3, 4, 5, 6], True), ([0], True),
    ([1, 2, 5], False),  # 5 lies below 2
    ([1, 5], False),  # node 6's records belong to no leaf
    ([2, 1], False), ([1, 1, 2], False), ([1, 7], False),
])
def test_a_crafted_tree_is_refused(leaves: list[int], ok: bool) -> None:
    problem = tree_problem(BOX, 2, 0, np.array(leaves))
    assert (problem is None) is ok
    if not ok:
        with pytest.raises(ValueError, match="not a partition"):
            GlobalTree(BOX, 2, 0, np.array(leaves))


def test_a_box_outside_the_public_bounds_is_refused() -> None:
    assert "inside" in tree_problem((np.full(3, -0.6), np.full(3, 0.5)), 2, 0, np.array([0]))


# ---- sensitivity on neighbouring datasets ----------------------------------------------------

def _neighbour_pairs(seed: int):
    rng = np.random.default_rng(seed)
    base = _rows(300, seed)
    corners = np.array([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5], [0.5, -0.5, 0.5]])
    for extra in [*corners, rng.uniform(-0.5, 0.5, 3)]:
        yield base, np.vstack([base, extra])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_sum_moves_by_at_most_its_sensitivity(seed: int) -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    box = (np.array([-0.3, -0.4, -0.2]), np.array([0.3, 0.4, 0.2]))
    depth = 6
    tree = GlobalTree(box, depth, 0, prune_tree(
        node_counts(_rows(300, seed), box, depth, 0).astype(float), depth,
        split_threshold=30, min_records=3))
    for small, large in _neighbour_pairs(seed):
        a, b = _shares(small, plan), _shares(large, plan)
        gaps = {
            "histograms": (np.linalg.norm(b.histograms(EXACT) - a.histograms(EXACT)),
                           histogram_sensitivity(3)),
            "counts": (np.linalg.norm(b.counts(EXACT, box, depth) - a.counts(EXACT, box, depth)),
                       count_sensitivity(depth, 1)),
            "grams": (np.linalg.norm((b.grams(EXACT, [tree]) - a.grams(EXACT, [tree]))
                                     .astype(float)), gram_share_sensitivity(3, 1)),
        }
        for name, (gap, bound) in gaps.items():
            assert gap <= bound + 1e-9, name


def test_a_corner_record_nearly_fills_the_gram_bound() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    tree = GlobalTree(BOX, 0, 0, np.array([0]))
    a = _shares(np.zeros((0, 3)), plan)
    b = _shares(np.full((1, 3), 0.5), plan)
    gap = np.linalg.norm((b.grams(EXACT, [tree]) - a.grams(EXACT, [tree])).astype(float))
    assert gap >= 0.99 * QUANT_SCALE * gram_sensitivity(3)


# ---- noise, ledger, refusal ------------------------------------------------------------------

def test_the_sum_of_t_shares_carries_the_planned_noise() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    steps = SecureSteps.from_plan(plan)
    box = BOX
    depth = 10
    shares = []
    for number in range(3):  # three empty sites: each share is its noise only
        ledger = PrivacyLedger.in_memory(plan.rho_total, f"s{number}")
        site = _shares(np.zeros((0, 3)), plan, ledger=ledger,
                       noise=SeededGaussianNoise(number))
        shares.append(site.counts(steps, box, depth))
    total, _ = plain_sum("counts", {str(i): s for i, s in enumerate(shares)})
    expected = ddg_sigma(count_sensitivity(depth, 1), steps.rho_counts, 2, n_nodes(depth))
    assert np.std(total) == pytest.approx(expected * math.sqrt(3), rel=0.05)


def test_every_sum_is_charged_before_noise_and_the_plan_is_spent_exactly() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    sites = {}
    for number in range(3):
        ledger = PrivacyLedger.in_memory(plan.rho_total, f"s{number}")
        sites[f"s{number}"] = _shares(_rows(400, number), plan, ledger=ledger,
                                      noise=SeededGaussianNoise(number), site_id=f"s{number}")
    bank = secure_bank(sites, plan, SecureSettings(3, 2))
    for site in sites.values():
        entries = site.ledger.entries
        assert [e.mechanism for e in entries] == [DDG_MECHANISM] * 3
        assert all("threshold 2" in (e.assumption or "") for e in entries)
        assert site.ledger.spent_rho == pytest.approx(plan.rho_total, rel=1e-9)
    assert bank.meta["aggregation"] == "secure" and bank.meta["survivors"] == sorted(sites)
    assert set(bank.site) == {SECURE_SITE}


def test_a_site_that_cannot_pay_the_plan_releases_nothing() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    ledger = PrivacyLedger.in_memory(plan.rho_total / 2, "poor")
    with pytest.raises(BudgetExceeded):
        _shares(_rows(100), plan, ledger=ledger)
    assert ledger.spent_rho == 0


def test_a_refused_sum_draws_no_noise() -> None:
    plan = plan_privacy(1.0, 1e-6, 3)
    steps = SecureSteps.from_plan(plan)
    ledger = PrivacyLedger.in_memory(plan.rho_total, "a")
    noise = RecordingNoise()
    site = _shares(_rows(100), plan, ledger=ledger, noise=noise)
    ledger.charge(mechanism="gaussian", sensitivity_l2=1.0, sigma=1.0,
                  rho=plan.rho_total - steps.rho_counts / 2, purpose="earlier",
                  dimension=1, noise_source="test")
    with pytest.raises(BudgetExceeded):
        site.counts(steps, BOX, 4)
    assert noise.calls == 0


# ---- the estimator and a site's view of a summed bank ---------------------------------------

def _federation(seed: int = 0) -> list[np.ndarray]:
    tables = [_rows(n, seed + n) * 10 for n in (400, 300, 200, 60)]
    for table in tables:
        table[::7, 1] = np.nan
    return tables


def test_exact_secure_bank_holds_every_released_record_once_per_tree() -> None:
    tables = _federation()
    model = FederatedIIM(epsilon=math.inf, aggregation="secure", min_records=1, max_depth=8,
                         bounds=np.tile([-5.0, 5.0], (3, 1))).fit(tables)
    complete = sum(int((~np.isnan(t).any(axis=1)).sum()) for t in tables)
    per_tree = np.bincount(model.bank_.tree, weights=model.bank_.counts)
    assert np.allclose(per_tree, complete, atol=1e-3)
    imputed = model.transform(tables)
    assert all(not np.isnan(t).any() for t in imputed)


def test_auto_sums_securely_from_three_sites() -> None:
    tables = _federation()
    bounds = np.tile([-5.0, 5.0], (3, 1))
    three = FederatedIIM(epsilon=4.0, aggregation="auto", seed=0, bounds=bounds).fit(tables[:3])
    two = FederatedIIM(epsilon=4.0, aggregation="auto", seed=0, bounds=bounds).fit(tables[:2])
    assert three.bank_.meta["aggregation"] == "secure"
    assert "aggregation" not in two.bank_.meta
    with pytest.raises(ValueError, match="aggregation"):
        FederatedIIM(aggregation="nope", bounds=bounds).fit(tables)


def test_seeded_secure_fit_is_reproducible() -> None:
    tables = _federation()
    bounds = np.tile([-5.0, 5.0], (3, 1))
    fits = [FederatedIIM(epsilon=2.0, aggregation="secure", seed=3, bounds=bounds).fit(tables)
            for _ in range(2)]
    assert np.array_equal(fits[0].bank_.gram, fits[1].bank_.gram)


def test_a_site_reads_the_summed_bank_without_its_own_rows() -> None:
    tables = _federation()
    bounds = np.tile([-5.0, 5.0], (3, 1))
    model = FederatedIIM(epsilon=math.inf, aggregation="secure", min_records=1, max_depth=8,
                         bounds=bounds).fit(tables)
    bank = model.bank_
    assert own_cells(bank, "site0").size == bank.n_cells
    scaled = tables[0] / 10.0
    others = other_sites_bank(bank, "site0", scaled)
    released = int((~np.isnan(tables[0]).any(axis=1)).sum())
    removed = bank.counts.sum() - others.counts.sum()
    assert removed == pytest.approx(released * bank.n_trees, abs=1e-6)
    rest = FederatedIIM(epsilon=math.inf, aggregation="secure", min_records=1, max_depth=8,
                        bounds=bounds).fit(tables[1:])
    assert others.counts.sum() == pytest.approx(rest.bank_.counts.sum(), abs=1e-2)
