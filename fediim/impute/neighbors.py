"""k-nearest-neighbour search that scales: never an n x n distance matrix.

One interface, :class:`NeighborIndex`, three methods:

* ``"kdtree"`` (exact): ``scipy.spatial.cKDTree``, for low-dimensional data (the common
  case for tabular imputation);
* ``"blas"`` (exact): blocked BLAS (``|q|^2 - 2 q.x + |x|^2`` on row blocks,
  ``argpartition`` per block), for wider data, where a KD-tree degrades;
* ``"hnsw"`` (approximate): faiss's HNSW graph (the optional ``approx`` extra). Its recall
  is checked when it is built: on :data:`RECALL_SAMPLE` of its own rows against the exact
  search, the search depth doubles until the recall of the k nearest reaches
  :data:`RECALL_FLOOR` (:meth:`NeighborIndex.recall` measures it for any k).

``"auto"`` (:func:`auto_method`) picks the approximate index only for the shapes where the
benchmark of benchmarks/README.md ("Neighbour indexes") has it faster at equal NRMSE: faiss
installed, and either wide data (63 features) with every reference row queried (the
engine's full validation) or, above 50,000 rows where the engine's validation is bounded,
15 to 62 features; otherwise the faster exact method for the width. An approximate index
below its recall floor at :data:`HNSW_MAX_DEPTH` falls back to the exact search.

Ties in distance are broken by row position (the earlier reference row first), exactly, also
at the k-th place: the KD-tree path widens its query until the tie group at the boundary is
complete, the BLAS path re-selects rows whose k-th place is tied. This is the convention of a
stable sort, as in the IIM authors' reference code
(which it reproduces on their ASF example).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Literal

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["INDEX_METHODS", "KDTREE_MAX_DIM", "NeighborIndex", "approximate_available",
           "auto_method", "exact_method"]

IndexMethod = Literal["auto", "kdtree", "blas", "hnsw"]
#: The methods :class:`NeighborIndex` accepts.
INDEX_METHODS: tuple[str, ...] = ("auto", "kdtree", "blas", "hnsw")
#: Above this many features the blocked BLAS search is used instead of a KD-tree
#: (the crossover lies between 31 and 63 in the benchmark).
KDTREE_MAX_DIM = 31
#: Above :data:`LARGE_TABLE_ROWS` reference rows (where the engine's validation is bounded,
#: ``fediim.impute.iim.FULL_VALIDATION_ROWS``, so few rows query many) the KD-tree is
#: kept only up to this many features: at 100,000 x 31 blocked BLAS took 0.72x its CPU.
KDTREE_MAX_DIM_LARGE = 15
LARGE_TABLE_ROWS = 50_000
_BLOCK_BYTES = 64 * 1024 * 1024
#: The approximate index's recall of the k nearest, checked when it is built.
RECALL_FLOOR = 0.99
#: Rows the recall check queries (all rows when fewer).
RECALL_SAMPLE = 256
#: HNSW graph degree and the search depth it starts from.
HNSW_DEGREE = 32
HNSW_START_DEPTH = 64
#: The deepest search the recall check tries before falling back to the exact method.
HNSW_MAX_DEPTH = 512
#: ``"auto"`` considers the approximate index from this many features and rows on: the
#: smallest shape where the benchmark measured it faster (10,000 x 63; at 31 it was not).
APPROX_MIN_FEATURES = 63
APPROX_MIN_ROWS = 10_000
#: With bounded validation (above :data:`LARGE_TABLE_ROWS` rows, only the rows being learned
#: and their validation tuples query) ``"auto"`` takes the approximate index from this many
#: features up to :data:`APPROX_MIN_FEATURES` - 1: hnsw took 0.71x the KD-tree's CPU at
#: 100,000 x 15, 0.47x BLAS's at 100,000 x 31 and 0.27x the KD-tree's at 1,000,000 x 15;
#: at 7 features the KD-tree won, at 63 BLAS tied.
APPROX_BOUNDED_MIN_FEATURES = 15
#: Threads of a KD-tree query (``cKDTree.query(workers=...)``; -1: every core).
KDTREE_WORKERS = -1


def approximate_available() -> bool:
    """Whether faiss (the ``approx`` extra) is installed, without importing it."""
    return importlib.util.find_spec("faiss") is not None


def exact_method(n_features: int, n_rows: int = 0) -> str:
    """The faster exact method for ``n_rows`` x ``n_features`` reference rows: a KD-tree
    up to :data:`KDTREE_MAX_DIM` features (:data:`KDTREE_MAX_DIM_LARGE` above
    :data:`LARGE_TABLE_ROWS` rows), blocked BLAS beyond."""
    limit = KDTREE_MAX_DIM_LARGE if n_rows > LARGE_TABLE_ROWS else KDTREE_MAX_DIM
    return "kdtree" if 0 < n_features <= limit else "blas"


def auto_method(n_rows: int, n_features: int, n_queries: int | None = None,
                approximate: bool | None = None, *, bounded: bool = False) -> str:
    """``"auto"``'s method for ``n_queries`` queries of ``n_rows`` x ``n_features`` rows.

    The approximate ``"hnsw"`` only where the benchmark ("Neighbour indexes" in
    benchmarks/README.md) has it faster at equal NRMSE, and only with faiss installed
    (``approximate``; None: :func:`approximate_available`):

    - every row queried (``n_queries >= n_rows``: the engine's full validation), at least
      :data:`APPROX_MIN_FEATURES` features and :data:`APPROX_MIN_ROWS` rows;
    - ``bounded`` validation above :data:`LARGE_TABLE_ROWS` rows (the engine's rule there:
      the rows being learned and their validation tuples query), from
      :data:`APPROX_BOUNDED_MIN_FEATURES` features up to :data:`APPROX_MIN_FEATURES` - 1
      (at 63 BLAS tied it).

    Otherwise (also when the queries are unknown) :func:`exact_method`.
    """
    if _approximate_pays(n_rows, n_features, n_queries, bounded):
        if approximate_available() if approximate is None else approximate:
            return "hnsw"
    return exact_method(n_features, n_rows)


def _approximate_pays(n_rows: int, n_features: int, n_queries: int | None,
                      bounded: bool) -> bool:
    """Whether the benchmark measured the approximate index faster for this shape."""
    if n_queries is not None and n_queries >= n_rows >= APPROX_MIN_ROWS:
        return n_features >= APPROX_MIN_FEATURES
    return (bounded and n_rows > LARGE_TABLE_ROWS
            and APPROX_BOUNDED_MIN_FEATURES <= n_features < APPROX_MIN_FEATURES)


class NeighborIndex:
    """Euclidean k-NN over a fixed set of reference rows, exact unless ``method="hnsw"``.

    Parameters
    ----------
    data : (n, d) float array without NaN
        Reference rows.
    method : {"auto", "kdtree", "blas", "hnsw"}, default="auto"
        The search (see the module); ``"auto"`` is :func:`auto_method`.
    k_hint : int, default=10
        The k whose recall the approximate index checks when it is built.
    n_queries : int, optional
        How many queries the index will answer, for ``"auto"`` (None: unknown, exact).
    bounded : bool, default=False
        For ``"auto"``: the engine's bounded validation will query it (see
        :func:`auto_method`).

    An approximate index whose recall check fails falls back to :func:`exact_method`
    (``method`` then names it).
    """

    def __init__(self, data: np.ndarray, method: IndexMethod = "auto", k_hint: int = 10,
                 n_queries: int | None = None, *, bounded: bool = False) -> None:
        data = np.ascontiguousarray(data, dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(f"data must be 2-D, got shape {data.shape}")
        if not np.all(np.isfinite(data)):
            raise ValueError("data for a neighbour index must be finite (no NaN/inf)")
        if method not in INDEX_METHODS:
            raise ValueError(f"method must be one of {INDEX_METHODS}, got {method!r}")
        self._data = data
        self.n, self.dim = data.shape
        self.method = (auto_method(self.n, self.dim, n_queries, bounded=bounded)
                       if method == "auto" else method)
        if self.dim == 0:
            self.method = "kdtree"  # no features: every row is equally near
        #: The recall of the k_hint nearest measured when built (1.0: exact).
        self.recall_at_build = 1.0
        self._tree: Any = None
        self._sqnorm: np.ndarray | None = None
        self._hnsw: Any = _build_hnsw(self._data) if self.method == "hnsw" else None
        if self._hnsw is not None and not self._tune_depth(k_hint):
            self._fall_back(asked=method == "hnsw")
        if self.method == "kdtree" and self.dim:
            self._tree = cKDTree(self._data)
        if self.method == "blas":
            self._sqnorm = np.einsum("ij,ij->i", self._data, self._data)

    def _tune_depth(self, k: int) -> bool:
        """Double the HNSW search depth until :meth:`recall` reaches :data:`RECALL_FLOOR`;
        False when it does not by :data:`HNSW_MAX_DEPTH` (or n)."""
        self.depth = HNSW_START_DEPTH
        while True:
            self._hnsw.hnsw.efSearch = self.depth
            self.recall_at_build = self.recall(k)
            if self.recall_at_build >= RECALL_FLOOR:
                return True
            if self.depth >= min(HNSW_MAX_DEPTH, self.n):
                return False
            self.depth = min(2 * self.depth, HNSW_MAX_DEPTH)

    def _fall_back(self, asked: bool) -> None:
        """Answer exactly instead of an approximate index below its recall floor (with a
        warning when ``"hnsw"`` was asked for by name); ``recall_at_build`` keeps the
        recall that failed."""
        if asked:
            warnings.warn(f"the HNSW index found {self.recall_at_build:.3f} of the nearest "
                          f"rows (< RECALL_FLOOR {RECALL_FLOOR}) at search depth "
                          f"{self.depth}: searching exactly instead", RuntimeWarning,
                          stacklevel=3)
        self._hnsw = None
        self.method = exact_method(self.dim, len(self._data))

    def recall(self, k: int, sample: int = RECALL_SAMPLE, seed: int = 0) -> float:
        """Share of the exact k nearest (other rows included; ties: any member) that this
        index finds, over ``sample`` of its own rows; 1.0 for the exact methods."""
        if self.method != "hnsw":
            return 1.0
        k = int(min(k, self.n))
        rows = np.random.default_rng(seed).permutation(self.n)[:sample]
        queries = self._data[rows]
        _, found = self.query(queries, k)
        exact_d, _ = _exact_blocked(self._data, None, queries, k)
        found_d = np.linalg.norm(self._data[found] - queries[:, None, :], axis=2)
        # A found row counts when it is no farther than the exact k-th (ties included).
        hits = found_d <= exact_d[:, -1:] * (1 + 1e-9) + 1e-12
        return float(hits.mean())

    def query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(dist, idx)`` of the ``k`` nearest reference rows, nearest first.

        ``k`` is capped at ``n``; equal distances are ordered by row position (exact
        methods; the approximate one orders what it found the same way).
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
        elif self._hnsw is not None:
            dist, idx = self._hnsw_query(queries, k)
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
        dist, idx = self._tree.query(queries, k=extra, workers=KDTREE_WORKERS)
        dist, idx = dist.reshape(len(queries), extra), idx.reshape(len(queries), extra)
        if extra > k:
            # Rows whose k-th and (k+1)-th distances tie may have the wrong row at the
            # boundary: widen their query until the tie group is complete.
            open_rows = np.flatnonzero(dist[:, k - 1] == dist[:, k])
            out_d, out_i = dist[:, :k].copy(), idx[:, :k].copy()
            width = extra
            while open_rows.size:
                width = min(self.n, 2 * width)
                wide_d, wide_i = self._tree.query(queries[open_rows], k=width,
                                                  workers=KDTREE_WORKERS)
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
        return _exact_blocked(self._data, self._sqnorm, queries, k)

    def _hnsw_query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate search; a query it returns fewer than k rows for is answered
        exactly. Distances are recomputed in float64, ties ordered by position."""
        self._hnsw.hnsw.efSearch = max(self.depth, k)
        _, idx = self._hnsw.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        short = np.flatnonzero((idx < 0).any(axis=1))
        if short.size:
            idx[short] = _exact_blocked(self._data, None, queries[short], k)[1]
        dist = np.linalg.norm(self._data[idx] - queries[:, None, :], axis=2)
        order = np.lexsort((idx, dist), axis=1)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1)


def _build_hnsw(data: np.ndarray) -> Any:
    """faiss's HNSW graph over ``data`` (float32); needs the ``approx`` extra."""
    try:
        import faiss
    except ImportError as exc:  # an optional extra, never a runtime dependency
        raise ImportError("method='hnsw' needs faiss: pip install 'fediim[approx]'") from exc
    index = faiss.IndexHNSWFlat(data.shape[1], HNSW_DEGREE)
    index.add(np.ascontiguousarray(data, dtype=np.float32))
    return index


def _exact_blocked(data: np.ndarray, sqnorm: np.ndarray | None, queries: np.ndarray, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``queries`` in ``data`` by blocked BLAS (``sqnorm``: the rows' squared
    norms, computed when None), ties by position."""
    n = len(data)
    if sqnorm is None:
        sqnorm = np.einsum("ij,ij->i", data, data)
    block_rows = max(1, _BLOCK_BYTES // (8 * max(n, 1)))
    out_d = np.empty((len(queries), k))
    out_i = np.empty((len(queries), k), dtype=np.intp)
    for start in range(0, len(queries), block_rows):
        block = queries[start : start + block_rows]
        d2 = sqnorm[None, :] - 2.0 * (block @ data.T)
        d2 += np.einsum("ij,ij->i", block, block)[:, None]
        np.maximum(d2, 0.0, out=d2)
        part = _k_smallest(d2, k, n)
        part_d2 = np.take_along_axis(d2, part, axis=1)
        # Sort by distance, ties by position.
        order = np.lexsort((part, part_d2), axis=1)
        out_i[start : start + block_rows] = np.take_along_axis(part, order, axis=1)
        out_d[start : start + block_rows] = np.sqrt(np.take_along_axis(part_d2, order, axis=1))
    return out_d, out_i


def _k_smallest(d2: np.ndarray, k: int, n: int) -> np.ndarray:
    """Per row of squared distances ``d2``, the positions of its k smallest (unordered);
    a tie at the k-th place goes to the earlier reference row."""
    if k >= n:
        return np.broadcast_to(np.arange(n), d2.shape).copy()
    part = np.argpartition(d2, k - 1, axis=1)[:, :k]
    # Ties at the k-th place: argpartition picks an arbitrary member of the tie group;
    # redo those (rare) rows exactly, preferring the earlier row.
    kth = np.take_along_axis(d2, part, axis=1).max(axis=1)
    n_within = np.count_nonzero(d2 <= kth[:, None], axis=1)
    for row in np.flatnonzero(n_within > k):
        tied = np.flatnonzero(d2[row] <= kth[row])
        part[row] = tied[np.lexsort((tied, d2[row, tied]))[:k]]
    return part
