"""Private partitioning of a site's complete records into disjoint cells (PrivTree-style).

A kd-style tree over the public bounds: the root is the whole box; a cell is split at the
midpoint of its next attribute (cycling) when its *noisy* count says it is large enough; a
split that leaves a child below ``min_records`` (by its noisy count) is undone and the next
attribute is tried, so no record is lost to a cell too small to release. The counts of one
depth are released together (the cells are disjoint, so one
record changes one count by one: L2 sensitivity 1, parallel composition within a depth,
sequential across depths). The split decision is post-processing of those counts, so the
tree's shape — and therefore every cell's bounds — is public once released.

The leaves partition the records: each record falls in exactly one leaf. Only leaves carry
Gram matrices (see :mod:`fediim.federated`); the depth at which a region stops splitting is
where the noisy counts said signal and noise break even, and the model bank then pools
neighbouring leaves, so the bias/noise trade of "levels" is made per anchor at imputation
time (pool few cells -> local model, pool many -> global model).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from fediim.privacy import (
    NoiseSource,
    PrivacyLedger,
    count_sensitivity,
    release_gaussian,
)

__all__ = ["Leaf", "PartitionPlan", "build_partition", "split_fraction"]


@dataclass(frozen=True)
class PartitionPlan:
    """Public parameters of the tree.

    max_depth : depth cap (counts are released for depths 0..max_depth: at most
        ``max_depth + 1`` releases).
    rho_per_depth : zCDP budget of one depth's count release (inf = exact counts, no charge).
    split_threshold : a cell is split when its noisy count is at least this.
    min_records : a split is undone when either child's noisy count falls below this, so
        that no record is lost to a cell too small to be released.
    """

    max_depth: int
    rho_per_depth: float
    split_threshold: float
    min_records: int = 1


@dataclass
class Leaf:
    """A leaf cell: its public box (in [-1/2, 1/2]^m coordinates) and its member rows."""

    path: str
    lo: np.ndarray
    hi: np.ndarray
    rows: np.ndarray
    axis: int = 0  # the attribute this cell is split on next
    tries: int = 0  # failed split attempts (a too-small child) so far

    @property
    def center(self) -> np.ndarray:
        return 0.5 * (self.lo + self.hi)

    @property
    def width(self) -> np.ndarray:
        return self.hi - self.lo


def build_partition(
    x: np.ndarray,
    plan: PartitionPlan,
    *,
    ledger: PrivacyLedger | None,
    noise: NoiseSource | None = None,
    tree: int = 0,
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Leaf]:
    """Split the rows of ``x`` (n, m), already scaled into [-1/2, 1/2], into leaves.

    The root cell is ``box`` (the site's clipping box, public once released; the rows must
    lie in it) or, by default, the whole of [-1/2, 1/2]^m.

    Every depth's counts are charged to ``ledger`` before they are drawn; with
    ``rho_per_depth = inf`` counts are exact and nothing is charged. ``tree`` numbers one of
    several partitions of the same records: tree 0 splits at midpoints starting with
    attribute 0; tree t > 0 starts with attribute ``t mod m`` and splits at a public
    pseudo-random fraction of each cell (see :func:`split_fraction`), so the trees' cell
    boundaries differ. Both choices are data-free.
    """
    n_rows, n_features = x.shape
    low, high = box if box is not None else (np.full(n_features, -0.5),
                                             np.full(n_features, 0.5))
    root = Leaf("r", np.array(low, dtype=np.float64), np.array(high, dtype=np.float64),
                np.arange(n_rows), axis=tree % n_features)
    # The frontier holds sibling pairs (or the root alone) together with their parent.
    frontier: list[tuple[Leaf | None, list[Leaf]]] = [(None, [root])]
    leaves: list[Leaf] = []
    for depth in range(plan.max_depth + 1):
        if not frontier:
            break
        cells = [cell for _, group in frontier for cell in group]
        counts = _depth_counts(cells, plan, depth, ledger=ledger, noise=noise)
        frontier = _next_frontier(x, frontier, counts, plan, depth, tree, leaves)
    return leaves


def _depth_counts(cells: list[Leaf], plan: PartitionPlan, depth: int, *,
                  ledger: PrivacyLedger | None, noise: NoiseSource | None) -> np.ndarray:
    """The record counts of one depth's cells: released together with Gaussian noise
    (charged first), or exact when the plan says so."""
    counts = np.array([len(cell.rows) for cell in cells], dtype=np.float64)
    if not np.isfinite(plan.rho_per_depth):
        return counts
    if ledger is None:
        raise ValueError("a private partition needs a ledger to charge")
    return release_gaussian(
        counts,
        sensitivity_l2=count_sensitivity(),
        rho=plan.rho_per_depth,
        ledger=ledger,
        purpose=f"partition counts, depth {depth} ({len(cells)} cells)",
        noise=noise,
    )


def _next_frontier(x: np.ndarray, frontier: list[tuple[Leaf | None, list[Leaf]]],
                   counts: np.ndarray, plan: PartitionPlan, depth: int, tree: int,
                   leaves: list[Leaf]) -> list[tuple[Leaf | None, list[Leaf]]]:
    """Decide every frontier cell from its noisy count: split it (its children join the
    next frontier) or keep it as a leaf (appended to ``leaves``)."""
    n_features = x.shape[1]
    last_depth = depth == plan.max_depth
    upcoming: list[tuple[Leaf | None, list[Leaf]]] = []
    start = 0
    for parent, group in frontier:
        group_counts = counts[start : start + len(group)]
        start += len(group)
        if parent is not None and np.any(group_counts < plan.min_records):
            # A too-small child: undo the split, and try the next attribute instead
            # (at the next depth) until every attribute was tried.
            parent.tries += 1
            parent.axis = (parent.axis + 1) % n_features
            if parent.tries >= n_features or last_depth:
                leaves.append(parent)
            else:
                upcoming.append((parent, _split(x, parent, tree)))
            continue
        for cell, count in zip(group, group_counts, strict=True):
            if count < plan.split_threshold or last_depth:
                leaves.append(cell)
            else:
                upcoming.append((cell, _split(x, cell, tree)))
    return upcoming


def split_fraction(tree: int, path: str, axis: int) -> float:
    """Where along its axis a cell of ``tree`` is cut: 1/2 for tree 0, else in [0.3, 0.7].

    A hash of (tree, path, axis): public, reproducible, independent of the data.
    """
    if tree == 0:
        return 0.5
    uniform = zlib.crc32(f"{tree}:{path}:{axis}".encode()) / 2**32
    return 0.3 + 0.4 * uniform


def _split(x: np.ndarray, cell: Leaf, tree: int = 0) -> list[Leaf]:
    """Cut ``cell`` across its current axis at :func:`split_fraction` (data-free)."""
    axis = cell.axis
    cut = cell.lo[axis] + split_fraction(tree, cell.path, axis) * (cell.hi[axis] - cell.lo[axis])
    left = x[cell.rows, axis] < cut
    left_hi = cell.hi.copy()
    left_hi[axis] = cut
    right_lo = cell.lo.copy()
    right_lo[axis] = cut
    next_axis = (axis + 1) % x.shape[1]
    return [Leaf(cell.path + "0", cell.lo.copy(), left_hi, cell.rows[left], next_axis),
            Leaf(cell.path + "1", right_lo, cell.hi.copy(), cell.rows[~left], next_axis)]
