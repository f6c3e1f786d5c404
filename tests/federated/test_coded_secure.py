"""Coded columns in secure aggregation: the one-hot blocks stay in public coordinates in
every leaf and outside the clipping histograms, so the Gram sum's sensitivity is that of
the table's m columns (tested on neighbouring datasets), its noise is charged at that
scale, a site that cannot pay refuses, and FederatedIIM(aggregation="secure") imputes
declared levels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fediim import FederatedIIM
from fediim.federated.global_partition import GlobalTree, node_counts, prune_tree
from fediim.federated.plan import plan_privacy
from fediim.federated.secure_release import (
    QUANT_SCALE,
    SecureSettings,
    SecureSteps,
    SiteShares,
    gram_share_sensitivity,
    secure_bank,
)
from fediim.privacy import BudgetExceeded, PrivacyLedger, SeededGaussianNoise, gram_sensitivity
from fediim.privacy.distributed import DDG_MECHANISM, ddg_sigma, quantised_sensitivity
from tests.federated.test_coded_release import (
    BOUNDS,
    ENCODING,
    KINDS,
    M,
    _codes,
    _sites,
    check_declared_levels,
)

BLOCKS = ENCODING.onehot_blocks()  # [[1, 2, 3, 4], [5]]: 7 encoded columns
EXACT = SecureSteps(math.inf, math.inf, math.inf)
W = ENCODING.n_encoded


def _shares(codes: np.ndarray, plan, *, ledger=None, noise=None, site_id: str = "a",
            clip: np.ndarray | None = None) -> SiteShares:
    ledger = PrivacyLedger.in_memory(10.0, site_id) if ledger is None else ledger
    return SiteShares.from_table(
        ENCODING.encode(codes), ENCODING.encoded_bounds(BOUNDS), plan, SecureSettings(3, 2),
        site_id=site_id, ledger=ledger, noise=noise,
        clip_columns=ENCODING.encoded_flags(None) if clip is None else clip,
        onehot_blocks=BLOCKS)


def test_the_gram_share_sensitivity_folds_each_block_into_one_column() -> None:
    entries = (W + 1) * (W + 2) // 2
    assert gram_share_sensitivity(W, 2, BLOCKS) == quantised_sensitivity(
        math.sqrt(2) * gram_sensitivity(M), QUANT_SCALE, 2 * entries)
    assert gram_share_sensitivity(W, 2, BLOCKS) < gram_share_sensitivity(W, 2)


@pytest.mark.parametrize(("record", "tight"), [
    ([100.0, 3, 1, 250.0], True),    # a corner of the numeric box, binary 1
    ([0.0, 0, 0, 50.0], False),
    ([55.5, 2, 1, 131.0], False),
])
def test_neighbouring_datasets_move_the_gram_share_by_at_most_its_sensitivity(
        record: list[float], tight: bool) -> None:
    plan = plan_privacy(2.0, 1e-6, M, max_depth=4)
    codes = _codes(300, 4)
    small = _shares(codes, plan)
    box = (np.full(W, -0.5), np.full(W, 0.5))
    tree = GlobalTree(box, 4, 0, prune_tree(node_counts(small.rows, box, 4, 0).astype(float),
                                            4, split_threshold=30, min_records=3))
    large = _shares(np.vstack([codes, record]), plan)
    gap = np.linalg.norm((large.grams(EXACT, [tree]) - small.grams(EXACT, [tree]))
                         .astype(float))
    assert gap <= gram_share_sensitivity(W, 1, BLOCKS) + 1e-9
    if tight:  # within the quantisation slack of QUANT_SCALE * gram_sensitivity(m)
        assert gap >= 0.99 * QUANT_SCALE * gram_sensitivity(M)


def test_a_box_narrowing_a_coded_column_breaks_its_sensitivity() -> None:
    """Why a Flower site refuses a public box that narrows a coded column
    (tests/apps/test_flower_coded.py): clamped into it, a record's zero indicators move off
    zero, and neighbouring datasets then differ by more than the one-hot sensitivity."""
    plan = plan_privacy(2.0, 1e-6, M, max_depth=4)
    codes = _codes(300, 4)
    small = _shares(codes, plan)
    lo, hi = np.full(W, -0.5), np.full(W, 0.5)
    lo[BLOCKS[0]] = 0.4  # the chest-pain block
    tree = GlobalTree((lo, hi), 0, 0, np.zeros(1, np.int64))
    large = _shares(np.vstack([codes, [100.0, 3, 1, 250.0]]), plan)
    gap = np.linalg.norm((large.grams(EXACT, [tree]) - small.grams(EXACT, [tree]))
                         .astype(float))
    assert gap > 1.1 * gram_share_sensitivity(W, 1, BLOCKS)  # public box: <= 1 x


def test_the_sums_are_charged_at_the_coded_scale_and_the_bank_carries_its_noise() -> None:
    plan = plan_privacy(2.0, 1e-6, M, max_depth=4)
    sites = {f"s{n}": _shares(_codes(400, n), plan, site_id=f"s{n}",
                              ledger=PrivacyLedger.in_memory(plan.rho_total, f"s{n}"),
                              noise=SeededGaussianNoise(n)) for n in range(3)}
    bank = secure_bank(sites, plan, SecureSettings(3, 2))
    n_trees = plan.n_trees
    for site in sites.values():
        gram = site.ledger.entries[-1]
        assert gram.mechanism == DDG_MECHANISM and "Gram" in gram.purpose
        assert gram.sensitivity_l2 == gram_share_sensitivity(W, n_trees, BLOCKS)
        assert site.ledger.spent_rho == pytest.approx(plan.rho_total, rel=1e-9)
    assert bank.n_features == W and bank.n_cells > 0
    # the bank's sigma is the sum of three shares' noise at that scale, over QUANT_SCALE
    gram = sites["s0"].ledger.entries[-1]
    share = ddg_sigma(gram_share_sensitivity(W, n_trees, BLOCKS),
                      SecureSteps.from_plan(plan).rho_grams, 2, gram.dimension)
    np.testing.assert_allclose(bank.sigma, share * math.sqrt(3) / QUANT_SCALE, rtol=1e-12)
    # the one-hot columns are never narrowed by the summed histograms' box
    fixed = [c for block in BLOCKS for c in block]
    assert np.all(bank.clip_lo[:, fixed] == -0.5) and np.all(bank.clip_hi[:, fixed] == 0.5)


def test_a_site_that_cannot_pay_refuses_and_coded_columns_are_never_clipped() -> None:
    plan = plan_privacy(2.0, 1e-6, M, max_depth=4)
    poor = PrivacyLedger.in_memory(plan.rho_total * 0.99, "poor")
    with pytest.raises(BudgetExceeded):
        _shares(_codes(100, 5), plan, ledger=poor)
    assert poor.spent_rho == 0 and not poor.entries
    with pytest.raises(ValueError, match="must not be clipped"):
        _shares(_codes(100, 5), plan, clip=np.ones(W, bool))


def test_secure_federated_fit_imputes_declared_levels() -> None:
    truth, masked, hidden = _sites(0)
    model = FederatedIIM(epsilon=4.0, bounds=BOUNDS, column_kinds=KINDS, seed=0,
                         aggregation="secure").fit(masked)
    assert model.bank_.meta["aggregation"] == "secure" and model.bank_.n_features == W
    check_declared_levels(model, truth, masked, hidden)
    # "auto" sums securely from 3 sites, as in the Flower apps; two sites release their own
    auto = FederatedIIM(epsilon=4.0, bounds=BOUNDS, column_kinds=KINDS, seed=0).fit(masked)
    assert auto.bank_.meta["aggregation"] == "secure"
    np.testing.assert_array_equal(auto.bank_.gram, model.bank_.gram)
    two = FederatedIIM(epsilon=4.0, bounds=BOUNDS, column_kinds=KINDS, seed=0).fit(masked[:2])
    assert two.bank_.meta.get("aggregation", "per-site") == "per-site"
