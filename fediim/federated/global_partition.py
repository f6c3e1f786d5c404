"""The federation's shared partition: a complete kd-tree with public cuts, pruned by
securely summed noisy counts.

With secure aggregation every cell must be a sum over sites, so all sites partition
their records by one tree. Its cuts are public and data-free: the root is the federation's
clipping box, depth ``d`` cuts attribute ``(tree + d) mod m`` at
:func:`~fediim.federated.partition.split_fraction` of the cell (the midpoint for tree 0).
Each site counts its records in *every* node of the complete tree to a public depth ``D``
(heap order: node ``i`` has children ``2i + 1`` and ``2i + 2``); a record is in one node
per depth, so the count vector has L2 sensitivity ``sqrt(D + 1)`` per tree, the same
noise per count as releasing one depth at a time (zCDP composes exactly) but in one
secure sum instead of ``D + 1``. The coordinator prunes the summed noisy counts top-down
(:func:`prune_tree`): post-processing, so the leaves are public.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fediim.federated.partition import split_fraction

__all__ = ["MAX_TREE_DEPTH", "GlobalTree", "leaf_boxes", "leaf_of_rows", "n_nodes",
           "node_counts", "prune_tree", "tree_problem"]


@dataclass(frozen=True)
class GlobalTree:
    """One pruned tree of the shared partition (public).

    box : (lo, hi) the federation's clipping box, the root cell (scaled coordinates).
    depth : the complete tree's depth ``D`` (counts were released for depths 0..D).
    tree : which of the differently cut trees (0 cuts at midpoints).
    leaves : sorted heap indices of the leaves; every record falls in exactly one.
    """

    box: tuple[np.ndarray, np.ndarray]
    depth: int
    tree: int
    leaves: np.ndarray

    def __post_init__(self) -> None:
        problem = tree_problem(self.box, self.depth, self.tree, self.leaves)
        if problem:
            raise ValueError(f"not a partition a site may release over: {problem}")

    def boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """The leaves' boxes (lo, hi), each (n_leaves, m)."""
        return self._boxes

    @cached_property
    def _boxes(self) -> tuple[np.ndarray, np.ndarray]:
        return leaf_boxes(self.box, self.tree, self.leaves)


def tree_problem(box: tuple[np.ndarray, np.ndarray], depth: int, tree: int,
                 leaves: np.ndarray) -> str | None:
    """Why (box, depth, tree, leaves) is not a partition of the box, or None.

    A site checks the tree the coordinator sends before it releases anything over it: each
    record must fall in exactly one leaf (the sensitivity of the Gram sum rests on it), so
    the leaves must be distinct nodes none of which lies below another, covering every
    node at the deepest level."""
    lo, hi = (np.asarray(side, dtype=np.float64) for side in box)
    if lo.ndim != 1 or lo.shape != hi.shape or not np.all(np.isfinite(lo) & np.isfinite(hi)):
        return "the box must be two finite vectors of one length"
    if np.any(lo < -0.5) or np.any(hi > 0.5) or np.any(lo >= hi):
        return "the box must lie inside [-1/2, 1/2] with lo < hi"
    if not 0 <= depth <= MAX_TREE_DEPTH or tree < 0:
        return f"depth must lie in [0, {MAX_TREE_DEPTH}] and the tree index be >= 0"
    leaves = np.asarray(leaves)
    if leaves.ndim != 1 or leaves.dtype.kind not in "iu" or not leaves.size:
        return "leaves must be a non-empty vector of node indices"
    if np.any(np.diff(leaves) <= 0) or leaves[0] < 0 or leaves[-1] >= n_nodes(depth):
        return "leaves must be sorted, distinct nodes of the complete tree"
    level = np.floor(np.log2(leaves + 1)).astype(np.int64)
    span = 2 ** (depth - level)  # deepest-level nodes under each leaf
    first = (leaves + 1) * span - 1 - (2**depth - 1)  # their first position at that level
    order = np.argsort(first)
    if first[order[0]] != 0 or np.any(first[order][1:] != (first + span)[order][:-1]) or (
            (first + span)[order[-1]] != 2**depth):
        return "leaves must cover every record exactly once (no overlap, no gap)"
    return None


#: Deepest complete tree a site builds counts for (2**(D+1) - 1 nodes).
MAX_TREE_DEPTH = 20


def n_nodes(depth: int) -> int:
    """Nodes of a complete binary tree of ``depth`` (depths 0..depth)."""
    return 2 ** (depth + 1) - 1


def _axis(depth: int, tree: int, n_features: int) -> int:
    return (tree + depth) % n_features


def _path(node: int) -> str:
    """The node's path as :mod:`~fediim.federated.partition` names it ("r" + 0/1 per cut)."""
    bits = bin(node + 1)[3:]
    return "r" + bits


def _fractions(nodes: np.ndarray, level: int, tree: int, n_features: int) -> np.ndarray:
    """Where each of ``nodes`` (all at ``level``) is cut along its axis."""
    if tree == 0:
        return np.full(len(nodes), 0.5)
    axis = _axis(level, tree, n_features)
    unique, inverse = np.unique(nodes, return_inverse=True)
    values = np.array([split_fraction(tree, _path(int(node)), axis) for node in unique])
    return values[inverse]


def _step(node: np.ndarray, lo: np.ndarray, hi: np.ndarray, level: int, tree: int,
          right: np.ndarray | None = None, rows: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """One level down for each entry (a row, or a path): cut its box ``lo``/``hi`` (updated
    in place) and return (child node, went right). The side is ``right`` if given, else
    whether the row lies at or above the cut. The same float operations in every caller
    make a row's box and its leaf's box bit-identical."""
    axis = _axis(level, tree, lo.shape[1])
    cut = lo[:, axis] + _fractions(node, level, tree, lo.shape[1]) * (hi[:, axis] - lo[:, axis])
    if right is None:
        assert rows is not None
        right = rows[:, axis] >= cut
    lo[:, axis] = np.where(right, cut, lo[:, axis])
    hi[:, axis] = np.where(right, hi[:, axis], cut)
    return 2 * node + 1 + right, right


def _descend(rows: np.ndarray, box: tuple[np.ndarray, np.ndarray], depth: int, tree: int,
             stop: np.ndarray | None = None) -> list[np.ndarray]:
    """Each row's node at every depth 0..depth (a list of index arrays), going right when
    the row lies at or above the cut; with ``stop`` (sorted leaf indices) a row stays at
    the first leaf on its path."""
    n_rows = len(rows)
    lo, hi = (np.tile(np.asarray(side, np.float64), (n_rows, 1)) for side in box)
    node = np.zeros(n_rows, dtype=np.int64)
    path = [node]
    for level in range(depth):
        moving = np.ones(n_rows, bool) if stop is None else ~np.isin(node, stop)
        if not moving.any():
            break
        sub_lo, sub_hi = lo[moving], hi[moving]
        child, _ = _step(node[moving], sub_lo, sub_hi, level, tree, rows=rows[moving])
        lo[moving], hi[moving] = sub_lo, sub_hi
        node = node.copy()
        node[moving] = child
        path.append(node)
    return path


def leaf_boxes(box: tuple[np.ndarray, np.ndarray], tree: int, leaves: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The boxes (lo, hi) of ``leaves``, each (n_leaves, m), walked down their paths."""
    leaves = np.asarray(leaves, dtype=np.int64)
    level_of = np.floor(np.log2(leaves + 1)).astype(np.int64)
    lo, hi = (np.tile(np.asarray(side, np.float64), (len(leaves), 1)) for side in box)
    for level in range(int(level_of.max()) if len(leaves) else 0):
        deeper = level_of > level
        below = level_of[deeper] - level  # steps from this level's node to the leaf
        node = ((leaves[deeper] + 1) >> below) - 1
        right = (((leaves[deeper] + 1) >> (below - 1)) & 1).astype(bool)
        sub_lo, sub_hi = lo[deeper], hi[deeper]
        _step(node, sub_lo, sub_hi, level, tree, right=right)
        lo[deeper], hi[deeper] = sub_lo, sub_hi
    return lo, hi


def node_counts(rows: np.ndarray, box: tuple[np.ndarray, np.ndarray], depth: int,
                tree: int) -> np.ndarray:
    """A site's record count in every node of the complete tree (int64, heap order).

    ``rows``: the site's complete records, scaled and clamped to ``box``."""
    visited = np.concatenate(_descend(rows, box, depth, tree)) if len(rows) else (
        np.zeros(0, np.int64))
    return np.bincount(visited, minlength=n_nodes(depth)).astype(np.int64)


def prune_tree(counts: np.ndarray, depth: int, *, split_threshold: float,
               min_records: float) -> np.ndarray:
    """The leaves (sorted heap indices) of the tree the noisy ``counts`` call for.

    Top-down, a node is split when its noisy count reaches ``split_threshold``, unless one
    child's noisy count is below ``min_records`` while the other's is below the threshold
    (the cut would only shave off a sliver); otherwise, or at ``depth``, it is a leaf. A
    sliver cut off beside a large child becomes a leaf that the bank drops if its noisy
    count stays below ``min_records``: the public cuts cannot be moved to follow the
    data, as one site's tree can (:mod:`~fediim.federated.partition`).
    """
    if counts.shape != (n_nodes(depth),):
        raise ValueError(f"expected {n_nodes(depth)} counts for depth {depth}, got "
                         f"{counts.shape}")
    leaves, frontier = [], [0]
    for level in range(depth + 1):
        upcoming = []
        for node in frontier:
            if level == depth or counts[node] < split_threshold:
                leaves.append(node)
                continue
            children = counts[2 * node + 1], counts[2 * node + 2]
            if min(children) < min_records and max(children) < split_threshold:
                leaves.append(node)
            else:
                upcoming += [2 * node + 1, 2 * node + 2]
        frontier = upcoming
    return np.array(sorted(leaves), dtype=np.int64)


def leaf_of_rows(rows: np.ndarray, tree: GlobalTree) -> np.ndarray:
    """Each row's position in ``tree.leaves`` (rows scaled and clamped to the box)."""
    node = _descend(rows, tree.box, tree.depth, tree.tree, tree.leaves)[-1]
    return np.searchsorted(tree.leaves, node)
