"""The privacy plan: how a site's budget is split between counts and Gram releases.

A site's total spend is ``rho_clip`` (its private clipping box: a noisy count of its
records and two quantiles per column), ``rho_counts`` (one count release per tree depth,
parallel within a depth) and ``rho_gram`` (one Gram release over disjoint leaves, parallel
composition), all in ρ-zCDP and recorded in its ledger. Records enter every release scaled
into the schema's public bounds and clamped to the site's box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from fediim.federated.partition import PartitionPlan
from fediim.privacy import epsilon_to_rho, gaussian_sigma, gram_sensitivity

__all__ = ["EXACT_TREES", "MODES", "PLAN_DEFAULTS", "Mode", "PlanParams", "PrivacyPlan",
           "plan_privacy", "scale_to_bounds", "unscale"]

#: How a site imputes: a validated blend of local and federated (``hybrid``), the bank's
#: models alone (``federated``), its own exact IIM (``local``) or its column means (``mean``).
Mode = Literal["hybrid", "federated", "local", "mean"]
MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass(frozen=True)
class PlanParams:
    """The public knobs of a privacy plan besides (epsilon, delta): one place for defaults.

    min_records : no cell in the bank describes fewer records (by its noisy count).
    count_fraction : share of the budget spent on the partition's noisy counts.
    max_depth : the partition's depth cap; ``None`` picks by budget.
    cell_noise_ratio : a cell is split only while its children keep this many Gram noise
        standard deviations of records.
    n_trees : differently cut partitions released; ``None`` picks by budget.
    clip_fraction : share of the budget spent on the site's private clipping box (0: clamp
        to the public bounds only). Exact statistics (epsilon = inf) are never clipped.
    principal_axes : under secure sums, the clipping budget pays for the federation's
        moments instead of clipping histograms, and the shared partition is cut along
        their principal axes (:mod:`~fediim.federated.principal`). Per-site releases stay
        axis-aligned.
    """

    min_records: int = 10
    count_fraction: float = 0.1
    max_depth: int | None = None
    cell_noise_ratio: float = 4.0
    n_trees: int | None = None
    clip_fraction: float = 0.1
    principal_axes: bool = True


PLAN_DEFAULTS = PlanParams()


@dataclass(frozen=True)
class PrivacyPlan:
    """How one site's budget is spent (all public).

    rho_total : the site's budget for this fit, rho-zCDP.
    rho_gram : spent on the leaf Gram matrices, over all trees (one release per tree).
    partition : one tree's public parameters (per-depth count budget, threshold, depth cap).
    sigma_gram : Gaussian noise std of each Gram entry, in the leaf's own coordinates.
    n_trees : how many differently cut partitions of the same records are released; each
        tree gets ``1 / n_trees`` of the budget (a record is in one leaf per tree).
    rho_clip : spent on the site's clipping box (0: none; see :mod:`fediim.federated.clipping`).
    principal_axes : under secure sums ``rho_clip`` pays for the moments that give the
        partition's principal-axis frame instead (:mod:`fediim.federated.principal`).
    """

    rho_total: float
    rho_gram: float
    partition: PartitionPlan
    sigma_gram: float
    min_records: int
    n_trees: int = 1
    rho_clip: float = 0.0
    principal_axes: bool = False


#: Trees released when statistics are exact (epsilon = inf): they cost nothing, and a
#: mixture over differently cut partitions averages out where one tree's cuts fall
#: (benchmarks/README.md, "Engine notes").
EXACT_TREES = 4
#: Depth cap when statistics are exact: deeper trees leave smaller, more local cells; with
#: noise every depth costs count budget.
EXACT_MAX_DEPTH = 40


def plan_privacy(
    epsilon: float,
    delta: float,
    n_features: int,
    *,
    min_records: int = PLAN_DEFAULTS.min_records,
    count_fraction: float = PLAN_DEFAULTS.count_fraction,
    max_depth: int | None = PLAN_DEFAULTS.max_depth,
    cell_noise_ratio: float = PLAN_DEFAULTS.cell_noise_ratio,
    n_trees: int | None = PLAN_DEFAULTS.n_trees,
    clip_fraction: float = PLAN_DEFAULTS.clip_fraction,
    principal_axes: bool = PLAN_DEFAULTS.principal_axes,
) -> PrivacyPlan:
    """Split a site's (epsilon, delta) into the trees' counts and the leaves' Gram matrices.

    A cell is split while its noisy count exceeds ``2 * max(min_records, cell_noise_ratio *
    sigma_gram)``: each child should still hold enough records for its Gram matrix to carry
    signal above the noise (within-cell second moments grow like n/12 per attribute in the
    cell's coordinates, the noise like sigma_gram). ``max_depth`` defaults to 16 under noise
    and :data:`EXACT_MAX_DEPTH` for exact statistics; ``n_trees`` to 1 under noise (each
    extra tree would halve everyone's budget) and :data:`EXACT_TREES` for exact statistics.
    """
    if not 0 < count_fraction < 1:
        raise ValueError(f"count_fraction must be in (0, 1), got {count_fraction}")
    if not (0 <= clip_fraction and count_fraction + clip_fraction < 1):
        raise ValueError(f"clip_fraction must be >= 0 and leave budget for the Gram "
                         f"matrices (count_fraction + clip_fraction < 1), got {clip_fraction}")
    if min_records < 1:
        raise ValueError(f"min_records must be >= 1, got {min_records}")
    if n_trees is not None and n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
    if max_depth is not None and max_depth < 0:
        raise ValueError(f"max_depth must be >= 0 or None, got {max_depth}")
    if not cell_noise_ratio >= 0:
        raise ValueError(f"cell_noise_ratio must be >= 0, got {cell_noise_ratio}")
    if np.isinf(epsilon):
        depth = EXACT_MAX_DEPTH if max_depth is None else max_depth
        part = PartitionPlan(depth, np.inf, 2.0 * min_records, min_records)
        return PrivacyPlan(np.inf, np.inf, part, 0.0, min_records,
                           EXACT_TREES if n_trees is None else n_trees)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 (or inf), got {epsilon}")
    depth = 16 if max_depth is None else max_depth
    trees = 1 if n_trees is None else n_trees
    rho = epsilon_to_rho(epsilon, delta)
    rho_counts = count_fraction * rho
    rho_clip = clip_fraction * rho
    rho_gram = rho - rho_counts - rho_clip
    sigma = gaussian_sigma(gram_sensitivity(n_features), rho_gram / trees)
    threshold = 2.0 * max(min_records, cell_noise_ratio * sigma)
    part = PartitionPlan(depth, rho_counts / (trees * (depth + 1)), threshold, min_records)
    return PrivacyPlan(rho, rho_gram, part, sigma, min_records, trees, rho_clip,
                       bool(principal_axes))


def scale_to_bounds(x: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map each attribute's public bounds to [-1/2, 1/2], clamping; returns (scaled, n_clamped).

    NaN stays NaN. Clamping is what makes the sensitivity bound hold.
    """
    lo, hi = bounds[:, 0], bounds[:, 1]
    scaled = (x - lo) / (hi - lo) - 0.5
    with np.errstate(invalid="ignore"):
        clamped = np.sum((scaled < -0.5) | (scaled > 0.5), axis=0)
    return np.clip(scaled, -0.5, 0.5), clamped


def unscale(values: np.ndarray, bounds: np.ndarray, cols: np.ndarray | int) -> np.ndarray:
    """Inverse of :func:`scale_to_bounds` for column(s) ``cols``."""
    lo, hi = bounds[cols, 0], bounds[cols, 1]
    return (values + 0.5) * (hi - lo) + lo
