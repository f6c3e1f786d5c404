"""Tests for fediim.federated.partition: the private kd tree (leaves, small splits, counts)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fediim.federated.partition as partition
from fediim.federated.partition import Leaf, PartitionPlan, build_partition
from fediim.privacy import PrivacyLedger, SeededGaussianNoise, gaussian_sigma
from tests.release_doubles import ReleaseRecorder


def _scaled(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Correlated rows already scaled into [-1/2, 1/2] (clamped)."""
    z = rng.normal(size=(n, 1))
    x = 0.15 * z * rng.uniform(0.5, 1.0, size=m) + 0.05 * rng.normal(size=(n, m))
    return np.clip(x, -0.5, 0.5)


def _in_box(x: np.ndarray, lf: Leaf) -> np.ndarray:
    """Membership by the split rule: [lo, hi) per attribute, hi closed at the box edge 1/2."""
    upper = (x < lf.hi) | ((lf.hi >= 0.5) & (x <= lf.hi))
    return np.all((x >= lf.lo) & upper, axis=1)


def _check_partition(x: np.ndarray, leaves: list[Leaf]) -> None:
    n, m = x.shape
    rows = np.concatenate([lf.rows for lf in leaves]) if leaves else np.array([], int)
    assert np.array_equal(np.sort(rows), np.arange(n)), "leaves must partition the rows"
    for lf in leaves:
        assert lf.lo.shape == lf.hi.shape == (m,)
        assert np.all(lf.lo < lf.hi)
        assert np.all(_in_box(x[lf.rows], lf)), "a row lies outside its leaf's box"
        assert np.sum(_in_box(x, lf)) == len(lf.rows), "the box holds rows of another leaf"
    # The boxes tile the unit cube: volumes add up to 1.
    assert sum(float(np.prod(lf.width)) for lf in leaves) == pytest.approx(1.0)


# --------------------------------------------------------------------------- exact trees


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_records", [1, 10, 40])
def test_exact_partition_covers_every_row_once(seed: int, min_records: int) -> None:
    rng = np.random.default_rng(seed)
    x = _scaled(rng, 600, 4)
    plan = PartitionPlan(max_depth=8, rho_per_depth=np.inf, split_threshold=2 * min_records,
                         min_records=min_records)
    leaves = build_partition(x, plan, ledger=None)
    _check_partition(x, leaves)
    assert len(leaves) > 1
    for lf in leaves:
        # With exact counts no split leaves a child below min_records.
        assert len(lf.rows) >= min_records
        assert len(lf.path) - 1 <= plan.max_depth
    assert len({lf.path for lf in leaves}) == len(leaves)


def test_large_threshold_gives_the_root() -> None:
    x = _scaled(np.random.default_rng(0), 100, 3)
    leaves = build_partition(x, PartitionPlan(5, np.inf, 1000.0, 1), ledger=None)
    assert len(leaves) == 1 and leaves[0].path == "r"
    np.testing.assert_array_equal(leaves[0].lo, -0.5)
    np.testing.assert_array_equal(leaves[0].hi, 0.5)
    np.testing.assert_array_equal(np.sort(leaves[0].rows), np.arange(100))


def test_max_depth_zero_gives_the_root() -> None:
    x = _scaled(np.random.default_rng(0), 100, 3)
    leaves = build_partition(x, PartitionPlan(0, np.inf, 1.0, 1), ledger=None)
    assert [lf.path for lf in leaves] == ["r"]


def test_splits_cycle_through_attributes_at_midpoints() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, size=(4000, 2))
    leaves = build_partition(x, PartitionPlan(2, np.inf, 10.0, 1), ledger=None)
    # Uniform data, depth 2: the four quadrants.
    assert sorted(lf.path for lf in leaves) == ["r00", "r01", "r10", "r11"]
    boxes = {lf.path: (tuple(lf.lo), tuple(lf.hi)) for lf in leaves}
    assert boxes["r00"] == ((-0.5, -0.5), (0.0, 0.0))
    assert boxes["r11"] == ((0.0, 0.0), (0.5, 0.5))
    _check_partition(x, leaves)


def test_undo_of_a_split_with_an_empty_child_tries_the_next_attribute() -> None:
    """All records in x0 < 0 but spread over x1: splitting x0 is undone, x1 is split."""
    rng = np.random.default_rng(2)
    x = np.column_stack([rng.uniform(-0.5, -0.01, 500), rng.uniform(-0.5, 0.5, 500)])
    leaves = build_partition(x, PartitionPlan(2, np.inf, 100.0, 10), ledger=None)
    _check_partition(x, leaves)
    # Depth 1 (split on x0) was undone; depth 2 splits the root on x1 instead.
    assert len(leaves) == 2
    for lf in leaves:
        assert lf.lo[0] == -0.5 and lf.hi[0] == 0.5
        assert lf.width[1] == 0.5
        assert len(lf.rows) >= 10


def test_identical_records_cannot_be_split_and_stay_one_leaf() -> None:
    x = np.full((50, 3), 0.1)
    leaves = build_partition(x, PartitionPlan(10, np.inf, 2.0, 1), ledger=None)
    _check_partition(x, leaves)
    assert len(leaves) == 1 and len(leaves[0].rows) == 50


def test_records_on_boundaries_and_corners_are_kept() -> None:
    corners = np.array([[s0, s1, s2] for s0 in (-0.5, 0.5) for s1 in (-0.5, 0.5)
                        for s2 in (-0.5, 0.5)])
    x = np.vstack([np.repeat(corners, 20, axis=0), np.zeros((40, 3))])
    leaves = build_partition(x, PartitionPlan(6, np.inf, 2.0, 1), ledger=None)
    _check_partition(x, leaves)


def test_empty_input_gives_an_empty_root() -> None:
    leaves = build_partition(np.zeros((0, 3)), PartitionPlan(4, np.inf, 2.0, 1), ledger=None)
    assert len(leaves) == 1 and len(leaves[0].rows) == 0


# --------------------------------------------------------------------------- private trees


def test_private_partition_needs_a_ledger() -> None:
    x = _scaled(np.random.default_rng(0), 50, 3)
    with pytest.raises(ValueError, match="ledger"):
        build_partition(x, PartitionPlan(3, 0.1, 10.0, 1), ledger=None)


@pytest.mark.parametrize("seed", range(3))
def test_private_partition_charges_one_count_release_per_depth(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = _scaled(rng, 800, 4)
    plan = PartitionPlan(max_depth=6, rho_per_depth=0.05, split_threshold=60.0,
                         min_records=10)
    ledger = PrivacyLedger.in_memory(1.0, "s")
    leaves = build_partition(x, plan, ledger=ledger, noise=SeededGaussianNoise(seed))
    _check_partition(x, leaves)
    entries = ledger.entries
    assert 1 <= len(entries) <= plan.max_depth + 1
    sigma = gaussian_sigma(1.0, plan.rho_per_depth)
    for e in entries:
        assert e.mechanism == "gaussian"
        assert e.sensitivity_l2 == 1.0
        assert e.rho == pytest.approx(plan.rho_per_depth, rel=1e-9)
        assert e.sigma == pytest.approx(sigma, rel=1e-12)
        assert e.noise_source == SeededGaussianNoise.name
    assert ledger.spent_rho <= (plan.max_depth + 1) * plan.rho_per_depth * (1 + 1e-9)


def test_private_partition_is_reproducible_with_a_seed() -> None:
    x = _scaled(np.random.default_rng(3), 500, 3)
    plan = PartitionPlan(5, 0.1, 40.0, 5)
    runs = [build_partition(x, plan, ledger=PrivacyLedger.in_memory(1.0, "s"),
                            noise=SeededGaussianNoise(7)) for _ in range(2)]
    assert [lf.path for lf in runs[0]] == [lf.path for lf in runs[1]]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)


# --------------------------------------------------------------------------- sensitivity


_COORD = st.one_of(st.sampled_from([-0.5, 0.5]), st.floats(-0.5, 0.5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    record=st.lists(_COORD, min_size=3, max_size=3),
    position=st.integers(0, 300),
    seed=st.integers(0, 5),
)
def test_count_vectors_of_neighbours_differ_by_at_most_one(
    record: list[float], position: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = _scaled(rng, 300, 3)
    x_nb = np.insert(x, position, np.asarray(record), axis=0)
    plan = PartitionPlan(max_depth=6, rho_per_depth=0.5, split_threshold=30.0, min_records=5)
    real = partition.release_gaussian
    first = ReleaseRecorder(real)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(partition, "release_gaussian", first)
        build_partition(x, plan, ledger=PrivacyLedger.in_memory(10.0, "s"),
                        noise=SeededGaussianNoise(seed))
        second = ReleaseRecorder(real, replay=first.released)
        mp.setattr(partition, "release_gaussian", second)
        leaves = build_partition(x_nb, plan, ledger=PrivacyLedger.in_memory(10.0, "s"),
                                 noise=SeededGaussianNoise(seed))
    _check_partition(x_nb, leaves)
    assert len(first.exact) == len(second.exact)
    total = 0
    for a, b in zip(first.exact, second.exact, strict=True):
        diff = np.linalg.norm(b - a)
        assert diff <= 1.0 + 1e-12
        total += int(round(diff))
    assert total >= 1  # the root count always moves (a record is in exactly one cell)
