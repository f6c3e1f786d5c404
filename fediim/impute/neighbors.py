"""Exact k-nearest-neighbour search that scales: never an n x n distance matrix.

Low-dimensional data (the common case for tabular imputation) goes through
``scipy.spatial.cKDTree``; wider data, where a KD-tree degrades, goes through blocked BLAS
(``|q|^2 - 2 q.x + |x|^2`` on row blocks, ``argpartition`` per block).

Ties in distance are broken by row position (the earlier reference row first), exactly, also
at the k-th place: the KD-tree path widens its query until the tie group at the boundary is
complete, the BLAS path re-selects rows whose k-th place is tied. This is the convention of a
stable sort, as in the IIM authors' reference code
(which it reproduces on their ASF example).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["NeighborIndex", "KDTREE_MAX_DIM"]

#: Above this many features the blocked BLAS search is used instead of a KD-tree.
KDTREE_MAX_DIM = 16
_BLOCK_BYTES = 64 * 1024 * 1024


class NeighborIndex:
    """Exact Euclidean k-NN over a fixed set of reference rows.

    Parameters
    ----------
    data : (n, d) float array without NaN
        Reference rows.
    """

    def __init__(self, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(f"data must be 2-D, got shape {data.shape}")
        if not np.all(np.isfinite(data)):
            raise ValueError("data for a neighbour index must be finite (no NaN/inf)")
        self._data = data
        self.n, self.dim = data.shape
        self._tree = cKDTree(self._data) if 0 < self.dim <= KDTREE_MAX_DIM else None
        self._sqnorm = np.einsum("ij,ij->i", self._data, self._data) if self._tree is None else None

    def query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(dist, idx)`` of the ``k`` nearest reference rows, nearest first.

        ``k`` is capped at ``n``; equal distances are ordered by row position.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float64)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (q, {self.dim}), got {queries.shape}")
        k = int(min(k, self.n))
        if k <= 0 or len(queries) == 0:
            return np.zeros((len(queries), 0)), np.zeros((len(queries), 0), dtype=np.intp)
        if self.dim == 0:
            # No features: every row is equally near; canonical order decides.
            idx = np.broadcast_to(np.arange(k), (len(queries), k))
            dist = np.zeros((len(queries), k))
        elif self._tree is not None:
            dist, idx = self._tree_query(queries, k)
        else:
            dist, idx = self._blocked_query(queries, k)
        return np.asarray(dist, dtype=np.float64), idx

    def nearest_others(self, k: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Each reference row's (or each of ``rows``') ``k`` nearest *other* reference rows,
        shape (len(rows), k), nearest first (``0 < k < n``). A row that duplicates displaced
        from its own list drops its farthest neighbour instead."""
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.intp)
        _, neighbors = self.query(self._data[rows], k + 1)
        keep = neighbors != rows[:, None]
        keep[keep.all(axis=1), -1] = False
        return neighbors[keep].reshape(len(rows), k)

    def _tree_query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """KD-tree query with exact position-order tie-breaking at the k-th place."""
        extra = k + 1 if k < self.n else k
        dist, idx = self._tree.query(queries, k=extra, workers=-1)
        dist, idx = dist.reshape(len(queries), extra), idx.reshape(len(queries), extra)
        if extra > k:
            # Rows whose k-th and (k+1)-th distances tie may have the wrong row at the
            # boundary: widen their query until the tie group is complete.
            open_rows = np.flatnonzero(dist[:, k - 1] == dist[:, k])
            out_d, out_i = dist[:, :k].copy(), idx[:, :k].copy()
            width = extra
            while open_rows.size:
                width = min(self.n, 2 * width)
                wide_d, wide_i = self._tree.query(queries[open_rows], k=width, workers=-1)
                wide_d = wide_d.reshape(len(open_rows), width)
                wide_i = wide_i.reshape(len(open_rows), width)
                order = np.lexsort((wide_i, wide_d), axis=1)
                wide_d = np.take_along_axis(wide_d, order, 1)
                wide_i = np.take_along_axis(wide_i, order, 1)
                done = (wide_d[:, k - 1] < wide_d[:, width - 1]) | (width == self.n)
                out_d[open_rows[done]] = wide_d[done, :k]
                out_i[open_rows[done]] = wide_i[done, :k]
                open_rows = open_rows[~done]
            dist, idx = out_d, out_i
        # Order ties inside the first k by position as well.
        order = np.lexsort((idx, dist), axis=1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)

    def _blocked_query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        block_rows = max(1, _BLOCK_BYTES // (8 * max(self.n, 1)))
        out_d = np.empty((len(queries), k))
        out_i = np.empty((len(queries), k), dtype=np.intp)
        for start in range(0, len(queries), block_rows):
            block = queries[start : start + block_rows]
            d2 = self._sqnorm[None, :] - 2.0 * (block @ self._data.T)
            d2 += np.einsum("ij,ij->i", block, block)[:, None]
            np.maximum(d2, 0.0, out=d2)
            part = self._k_smallest(d2, k)
            part_d2 = np.take_along_axis(d2, part, axis=1)
            # Sort by distance, ties by position.
            order = np.lexsort((part, part_d2), axis=1)
            out_i[start : start + block_rows] = np.take_along_axis(part, order, axis=1)
            out_d[start : start + block_rows] = np.sqrt(
                np.take_along_axis(part_d2, order, axis=1))
        return out_d, out_i

    def _k_smallest(self, d2: np.ndarray, k: int) -> np.ndarray:
        """Per row of squared distances ``d2``, the positions of its k smallest (unordered);
        a tie at the k-th place goes to the earlier reference row."""
        if k >= self.n:
            return np.broadcast_to(np.arange(self.n), d2.shape).copy()
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        # Ties at the k-th place: argpartition picks an arbitrary member of the tie group;
        # redo those (rare) rows exactly, preferring the earlier row.
        kth = np.take_along_axis(d2, part, axis=1).max(axis=1)
        n_within = np.count_nonzero(d2 <= kth[:, None], axis=1)
        for row in np.flatnonzero(n_within > k):
            tied = np.flatnonzero(d2[row] <= kth[row])
            part[row] = tied[np.lexsort((tied, d2[row, tied]))[:k]]
        return part
