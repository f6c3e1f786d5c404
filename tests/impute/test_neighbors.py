"""Exact kNN: both search paths against a brute-force stable sort of the full distance matrix."""

from __future__ import annotations

import numpy as np
import pytest

import fediim.impute.neighbors as nb
from fediim.impute.neighbors import NeighborIndex


def _brute(data, queries, k):
    """Sorted distances and positions from the full squared-distance matrix (stable sort)."""
    d2 = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(axis=2)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.take_along_axis(d2, order, axis=1)), order


#: The narrowest width "auto" searches by blocked BLAS.
WIDE = nb.KDTREE_MAX_DIM + 1


@pytest.fixture
def blocked(monkeypatch):
    """Force the blocked-BLAS path at any dimension, with tiny blocks (several per query)."""
    monkeypatch.setattr(nb, "KDTREE_MAX_DIM", 0)
    monkeypatch.setattr(nb, "_BLOCK_BYTES", 8 * 3 * 80)  # 3 query rows per block for n = 80


@pytest.mark.parametrize("k", [1, 2, 7, 30, 79, 80])
@pytest.mark.parametrize("dim", [1, 3, 8])
def test_kdtree_path_matches_brute_force(dim, k):
    rng = np.random.default_rng(100 + dim)
    data = rng.normal(size=(80, dim)) * rng.uniform(0.1, 10, size=dim)
    queries = np.vstack([rng.normal(size=(25, dim)), data[:5]])  # also queries on data rows
    index = NeighborIndex(data)
    assert index._tree is not None  # this is the KD-tree path
    dist, idx = index.query(queries, k)
    ref_d, ref_i = _brute(data, queries, k)
    assert idx.shape == (len(queries), k) and dist.shape == (len(queries), k)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 30, 80])
@pytest.mark.parametrize("dim", [WIDE, 40])
def test_blocked_path_matches_brute_force_high_dim(dim, k):
    rng = np.random.default_rng(200 + dim)
    data = rng.normal(size=(80, dim))
    queries = np.vstack([rng.normal(size=(20, dim)), data[10:14]])
    index = NeighborIndex(data)
    assert index._tree is None  # dim > KDTREE_MAX_DIM: blocked BLAS
    dist, idx = index.query(queries, k)
    ref_d, ref_i = _brute(data, queries, k)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-7, atol=1e-6)  # |q|^2 - 2qx + |x|^2


@pytest.mark.parametrize("k", [1, 5, 33, 80])
def test_blocked_path_forced_low_dim_several_blocks(blocked, k):
    rng = np.random.default_rng(7)
    data = rng.normal(size=(80, 3))
    queries = rng.normal(size=(17, 3))  # 17 rows over blocks of 3: a ragged last block
    index = NeighborIndex(data)
    assert index._tree is None
    dist, idx = index.query(queries, k)
    ref_d, ref_i = _brute(data, queries, k)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 4, 17, 50, 119, 120])
def test_kdtree_ties_broken_by_position_at_kth_place(seed, k):
    """Integer data on a 3 x 3 grid: huge tie groups, straddling the k-th place."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3, size=(120, 2)).astype(float)
    queries = np.vstack([rng.integers(0, 3, size=(30, 2)).astype(float), [[1.5, 0.5]]])
    index = NeighborIndex(data)
    assert index._tree is not None
    dist, idx = index.query(queries, k)
    d2 = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(axis=2)  # exact on this grid
    ref_i = np.argsort(d2, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(d2, ref_i, axis=1)), rtol=1e-12)
    # The boundary really is inside a tie group for most queries (the test is not vacuous).
    if k < len(data):
        srt = np.sort(d2, axis=1)
        assert np.mean(srt[:, k - 1] == srt[:, k]) > 0.5


def test_kdtree_ties_three_dims_many_duplicates():
    rng = np.random.default_rng(11)
    data = rng.integers(-1, 2, size=(300, 3)).astype(float)
    queries = data[::7]
    d2 = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(axis=2)
    for k in (2, 11, 12, 40):
        _, idx = NeighborIndex(data).query(queries, k)
        np.testing.assert_array_equal(idx, np.argsort(d2, axis=1, kind="stable")[:, :k])


def test_blocked_path_ties_broken_by_position_at_kth_place():
    # Squared distances to the origin are 11, 10, 8, 8: rows 2 and 3 tie for the nearest;
    # the position rule asks for row 2.
    data = np.zeros((4, WIDE))
    for row, ones in enumerate([11, 10, 8, 8]):
        data[row, :ones] = 1.0
    _, idx = NeighborIndex(data).query(np.zeros((1, WIDE)), 1)
    assert idx.tolist() == [[2]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 17, 119])
@pytest.mark.parametrize("dim", [2, 17])
def test_blocked_path_ties_random_integer_data(blocked, seed, k, dim):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3, size=(120, dim)).astype(float)
    queries = rng.integers(0, 3, size=(20, dim)).astype(float)
    index = NeighborIndex(data)
    assert index._tree is None
    _, idx = index.query(queries, k)
    d2 = ((queries[:, None, :] - data[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(idx, np.argsort(d2, axis=1, kind="stable")[:, :k])


def test_ties_inside_first_k_ordered_by_position_blocked():
    # Ties strictly inside the first k (not at the boundary) are ordered by position.
    data = np.zeros((6, WIDE))
    data[[1, 4], 0] = 1.0  # rows 0, 2, 3, 5 at distance 0; rows 1, 4 at distance 1
    _, idx = NeighborIndex(data).query(np.zeros((1, WIDE)), 6)
    assert idx.tolist() == [[0, 2, 3, 5, 1, 4]]


@pytest.mark.parametrize("dim", [2, WIDE])
def test_k_larger_than_n_is_capped(dim):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(5, dim))
    queries = rng.normal(size=(4, dim))
    dist, idx = NeighborIndex(data).query(queries, 10)
    assert idx.shape == (4, 5) and dist.shape == (4, 5)
    ref_d, ref_i = _brute(data, queries, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-7, atol=1e-7)
    assert all(sorted(row) == list(range(5)) for row in idx.tolist())


@pytest.mark.parametrize("dim", [1, 2, WIDE])
def test_k_equal_one_shape(dim):
    rng = np.random.default_rng(4)
    data = rng.normal(size=(30, dim))
    queries = rng.normal(size=(9, dim))
    dist, idx = NeighborIndex(data).query(queries, 1)
    assert dist.shape == (9, 1) and idx.shape == (9, 1)
    ref_d, ref_i = _brute(data, queries, 1)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-7, atol=1e-7)
    # A single reference row, k = 1.
    dist, idx = NeighborIndex(data[:1]).query(queries, 1)
    assert idx.shape == (9, 1) and np.all(idx == 0)
    np.testing.assert_allclose(dist[:, 0], np.linalg.norm(queries - data[0], axis=1))


def test_query_row_on_data_is_its_own_nearest():
    rng = np.random.default_rng(5)
    data = rng.normal(size=(50, 4))
    dist, idx = NeighborIndex(data).query(data, 3)
    np.testing.assert_array_equal(idx[:, 0], np.arange(50))
    np.testing.assert_array_equal(dist[:, 0], 0.0)


def test_zero_features_uses_position_order():
    dist, idx = NeighborIndex(np.zeros((4, 0))).query(np.zeros((2, 0)), 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2]]
    np.testing.assert_array_equal(dist, 0.0)


def test_empty_queries_and_k_zero():
    index = NeighborIndex(np.arange(6.0).reshape(3, 2))
    dist, idx = index.query(np.zeros((0, 2)), 2)
    assert dist.shape == (0, 0) and idx.shape == (0, 0)
    dist, idx = index.query(np.zeros((2, 2)), 0)
    assert dist.shape == (2, 0) and idx.shape == (2, 0)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="finite"):
        NeighborIndex(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="2-D"):
        NeighborIndex(np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        NeighborIndex(np.zeros((3, 2))).query(np.zeros((1, 3)), 1)
