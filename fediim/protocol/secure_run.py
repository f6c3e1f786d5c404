"""What the two apps share about a secure run: its shape, its public state, its limits.

A secure run (run config ``aggregation``) sums three statistics over the admitted sites
(:mod:`fediim.federated.secure_release`), one secure-sum session each
(:mod:`fediim.protocol.secure_sum`): the clipping ``histograms`` or, when the plan cuts along
principal axes, the ``moments`` (only when the plan spends on clipping), the ``counts`` of
the public tree, the leaf ``grams``. A later sum's vector
length follows from the earlier sums, so the coordinator announces each session's length
with its request. Between sums the coordinator sends the *public state* the next
statistic is computed over (the clipping box, the tree depth and the principal-axis frame if
any, then the pruned trees);
a site rebuilds it with :func:`decode_public_state`, which refuses anything that is not a
partition of the box (:func:`~fediim.federated.global_partition.tree_problem`) before the
site releases anything over it.

This module loads neither flwr nor cryptography.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from fediim.federated.bank import ModelBank
from fediim.federated.global_partition import GlobalTree, n_nodes
from fediim.federated.gram import augmented_upper_size
from fediim.federated.plan import PrivacyPlan
from fediim.federated.principal import Frame
from fediim.federated.secure_release import (
    HISTOGRAM_BINS,
    MIN_SECURE_SITES,
    QUANT_SCALE,
    SECURE_SITE,
    SecureSteps,
)
from fediim.federated.vetting import DEFAULT_MAX_RECORDS, ReleaseLimits

__all__ = ["MAX_ABS_PER_SITE", "STATISTICS", "PublicState", "decode_public_state",
           "secure_limits", "session_statistics", "tree_cells_problems", "use_secure"]

#: The per-site bound of every secure-sum input: a site's quantised Gram entry is at most
#: MAX_SITE_RECORDS (2^32) x QUANT_SCALE (2^16) = 2^48 before its noise, far below; with
#: it, up to 4,095 sites sum without wrapping (S x 2^50 < 2^62).
MAX_ABS_PER_SITE = 2**50
#: The three sums, in their order (the first is the moments when the plan cuts along
#: principal axes).
STATISTICS = ("histograms", "counts", "grams")


def use_secure(aggregation: str, n_admitted: int) -> bool:
    """Whether a run with ``n_admitted`` sites sums securely (``auto``: from 3 sites)."""
    return aggregation == "secure" or (aggregation == "auto"
                                       and n_admitted >= MIN_SECURE_SITES)


def session_statistics(plan: PrivacyPlan, clip_columns: np.ndarray) -> tuple[str, ...]:
    """The statistic of each session: the histograms or the moments only if the plan
    clips."""
    first = SecureSteps.from_plan(plan).first_statistic(clip_columns)
    return STATISTICS[1:] if first is None else (first, *STATISTICS[1:])


@dataclass(frozen=True)
class PublicState:
    """What a statistic is computed over: nothing (histograms), the clipping box and the
    tree depth (counts), or also the pruned trees (grams)."""

    box: tuple[np.ndarray, np.ndarray] | None = None
    depth: int | None = None
    trees: list[GlobalTree] = field(default_factory=list)
    frame: Frame | None = None

    def encode(self) -> bytes:
        """Canonical JSON bytes (floats as exact decimal strings of float64)."""
        doc: dict = {}
        if self.box is not None:
            doc["box"] = [[float(v).hex() for v in side] for side in self.box]
            doc["depth"] = int(self.depth or 0)
        if self.frame is not None:
            doc["frame"] = {"matrix": [[float(v).hex() for v in row]
                                       for row in self.frame.matrix],
                            "offset": [float(v).hex() for v in self.frame.offset]}
        if self.trees:
            doc["leaves"] = [[int(leaf) for leaf in tree.leaves] for tree in self.trees]
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def digest(self) -> str:
        """SHA-256 of :meth:`encode`."""
        return hashlib.sha256(self.encode()).hexdigest()

    def vector_length(self, statistic: str, clip_columns: np.ndarray, n_trees: int) -> int:
        """The length of ``statistic``'s vector over this state, for a release over
        ``len(clip_columns)`` columns whose ``clip_columns`` have histograms."""
        n_features = len(clip_columns)
        if statistic == "histograms":
            return int(np.sum(clip_columns)) * HISTOGRAM_BINS
        if statistic == "moments":
            return augmented_upper_size(n_features)
        if statistic == "counts":
            return n_trees * n_nodes(int(self.depth or 0))
        return sum(len(tree.leaves) for tree in self.trees) * augmented_upper_size(n_features)


def decode_public_state(data: bytes | None, n_features: int, n_trees: int) -> PublicState:
    """The public state in ``data``; :class:`ValueError` for anything else, in particular
    trees that are not partitions of the box (checked by :class:`GlobalTree`)."""
    try:
        doc = json.loads(bytes(data or b"{}").decode("utf-8"))
        if not isinstance(doc, dict) or set(doc) - {"box", "depth", "leaves", "frame"}:
            raise ValueError("a public state holds box, depth, frame and leaves only")
        return PublicState() if not doc else _state_of(doc, n_features, n_trees)
    except (KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise ValueError(f"a malformed public state ({type(exc).__name__}: {exc})") from None


def _state_of(doc: dict, n_features: int, n_trees: int) -> PublicState:
    """:func:`decode_public_state` of a parsed document."""
    lo, hi = (np.array([float.fromhex(v) for v in side], dtype=np.float64)
              for side in doc["box"])
    if lo.shape != (n_features,) or hi.shape != (n_features,):
        raise ValueError(f"the box must have {n_features} attributes")
    depth = doc["depth"]
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError("the depth must be an int")
    frame = _frame_of(doc["frame"], n_features) if "frame" in doc else None
    leaves = doc.get("leaves")
    if leaves is None:
        GlobalTree((lo, hi), depth, 0, np.zeros(1, np.int64))  # the box and depth are valid
        return PublicState((lo, hi), depth, frame=frame)
    if not isinstance(leaves, list) or len(leaves) != n_trees:
        raise ValueError(f"the state must hold the leaves of {n_trees} tree(s)")
    trees = [GlobalTree((lo, hi), depth, tree, np.array(tree_leaves, dtype=np.int64))
             for tree, tree_leaves in enumerate(leaves)]
    return PublicState((lo, hi), depth, trees, frame)


def _frame_of(doc: dict, n_features: int) -> Frame:
    """The principal-axis frame in a public state: a finite (m, m) matrix and (m,) offset.
    Any such frame keeps the sensitivities (records are clamped to its box); whether it
    leaves coded columns alone is the site's check."""
    if not isinstance(doc, dict) or set(doc) != {"matrix", "offset"}:
        raise ValueError("a frame holds a matrix and an offset")
    frame = Frame.from_meta({"matrix": [[float.fromhex(v) for v in row] for row in
                                        doc["matrix"]],
                             "offset": [float.fromhex(v) for v in doc["offset"]]})
    if len(frame.offset) != n_features:
        raise ValueError(f"the frame must have {n_features} attributes")
    return frame


def secure_limits(plan: PrivacyPlan, n_features: int, sigma_sum: float,
                  n_sites: int) -> ReleaseLimits:
    """The plan's limits adapted to a sum over ``n_sites`` sites: the sum's noise σ
    (``sigma_sum``, integer units) and ``n_sites`` times the per-site record cap."""
    return ReleaseLimits(n_features=n_features, sigma_gram=float(sigma_sum / QUANT_SCALE),
                         min_records=int(plan.min_records), n_trees=int(plan.n_trees),
                         max_records=int(DEFAULT_MAX_RECORDS * n_sites))


def tree_cells_problems(bank: ModelBank, trees: list[GlobalTree]) -> list[str]:
    """Why ``bank`` is not cells of ``trees`` summed over sites: every cell must be the
    federation's (no site's own), name a leaf of its tree and have that leaf's box."""
    if bank.n_cells and set(bank.site.astype(str).tolist()) != {SECURE_SITE}:
        return [f"cells of a secure run must all be {SECURE_SITE!r}'s"]
    boxes = {tree.tree: (tree.leaves, *tree.boxes()) for tree in trees}
    for cell, tree, lo, hi in zip(bank.cell.astype(str), bank.tree, bank.lo, bank.hi,
                                  strict=True):
        leaves, leaf_lo, leaf_hi = boxes.get(int(tree), (np.zeros(0, np.int64), None, None))
        name, _, leaf = cell.rpartition(":")
        position = int(np.searchsorted(leaves, int(leaf))) if leaf.isdigit() else -1
        if (name != f"{SECURE_SITE}:t{int(tree)}" or not 0 <= position < len(leaves)
                or leaves[position] != int(leaf)
                or not (np.array_equal(lo, leaf_lo[position])
                        and np.array_equal(hi, leaf_hi[position]))):
            return [f"cell {cell!r} is not a leaf of the run's public trees"]
    return []

