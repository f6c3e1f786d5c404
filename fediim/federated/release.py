"""A site's release (private partition + noised leaf Gram matrices) and the bank's assembly.

1. :func:`site_release` (site): scale complete records into the public bounds, clamp them
   to the site's private clipping box (:mod:`fediim.federated.clipping`), build the
   private partition inside it (noisy counts, charged), release every leaf's Gram matrix in the
   leaf's own coordinates with the Gaussian mechanism (charged to the site's ledger
   *before* noise is drawn), map back, drop cells whose noisy count is below
   ``min_records``. Returns the site's cells as a :class:`~fediim.federated.bank.ModelBank`.
2. :func:`assemble_bank` (coordinator): concatenate the sites' cells into one bank.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fediim.federated.bank import ModelBank
from fediim.federated.clipping import clamp_to_box, clip_min_records, private_clip_box
from fediim.federated.gram import (
    affine_map,
    augmented_gram,
    from_upper_triangle,
    project_psd,
    transform_gram,
    upper_triangle,
)
from fediim.federated.partition import build_partition
from fediim.federated.plan import PrivacyPlan, scale_to_bounds
from fediim.privacy import (
    BudgetExceeded,
    NoiseSource,
    PrivacyLedger,
    count_sensitivity,
    gram_sensitivity,
    release_gaussian,
)

__all__ = ["assemble_bank", "cell_coordinates", "site_release"]

def site_release(
    x: np.ndarray,
    bounds: np.ndarray,
    plan: PrivacyPlan,
    *,
    site_id: str,
    ledger: PrivacyLedger | None,
    noise: NoiseSource | None = None,
    clip_columns: np.ndarray | None = None,
) -> ModelBank:
    """A site's whole release: clipping box, private partition and noised leaf Gram
    matrices (see module). ``clip_columns``: public per-column flags of the columns the box
    may narrow (default all; codes must not be clipped, see
    :func:`~fediim.federated.clipping.private_clip_box`)."""
    x = np.asarray(x, dtype=np.float64)
    if np.isfinite(plan.rho_total):
        # Refuse the whole plan up front: a release that could not be finished must not
        # spend anything (the tree may stop early and spend less, never more).
        if ledger is None:
            raise ValueError("a private release needs a ledger to charge")
        if not ledger.can_afford(plan.rho_total):
            raise BudgetExceeded(
                f"site {site_id!r}: this release needs rho={plan.rho_total:.6g} but only "
                f"{ledger.remaining_rho:.6g} of {ledger.rho_budget:.6g} remains; nothing "
                "was released")
    complete = x[~np.isnan(x).any(axis=1)]
    xs, _ = scale_to_bounds(complete, bounds)
    box = site_clip_box(xs, plan, ledger=ledger, noise=noise, clip_columns=clip_columns)
    xs = clamp_to_box(xs, *box)[0]
    parts = [_release_tree(xs, plan, tree, site_id=site_id, ledger=ledger, noise=noise,
                           box=box)
             for tree in range(plan.n_trees)]
    return ModelBank.concat(parts) if len(parts) > 1 else parts[0]


#: Share of the clipping budget spent on the noisy record count that decides whether a
#: box pays at all (:func:`~fediim.federated.clipping.clip_min_records`).
CLIP_COUNT_SHARE = 0.1


def site_clip_box(xs: np.ndarray, plan: PrivacyPlan, *, ledger: PrivacyLedger | None,
                  noise: NoiseSource | None, clip_columns: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The site's clipping box (lo, hi) in scaled coordinates: the public bounds when the
    plan spends nothing on it, else a private box when the site's noisy record count says
    it pays, else the public bounds (the unspent quantile budget is not charged)."""
    n_features = xs.shape[1]
    public = (np.full(n_features, -0.5), np.full(n_features, 0.5))
    if plan.rho_clip <= 0:
        return public
    columns = np.ones(n_features, bool) if clip_columns is None else np.asarray(
        clip_columns, bool)
    if not columns.any():
        return public
    rho_count = CLIP_COUNT_SHARE * plan.rho_clip
    noisy_count = release_gaussian(
        np.array([float(len(xs))]), sensitivity_l2=count_sensitivity(), rho=rho_count,
        ledger=ledger, noise=noise, purpose="record count (does a clipping box pay?)")[0]
    rho_quantiles = plan.rho_clip - rho_count
    if noisy_count < clip_min_records(rho_quantiles, int(columns.sum())):
        return public
    return private_clip_box(xs, rho_quantiles, ledger=ledger, noise=noise,
                            clip_columns=columns, purpose="clipping box quantiles")


def cell_coordinates(rows: np.ndarray, center: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Records in a cell's own coordinates, its box mapped to [-1/2, 1/2].

    Clipped after mapping: rounding alone can put a record at 0.5000000000000011, just
    outside the box that the Gram sensitivity is computed for.
    """
    return np.clip((rows - center) / width, -0.5, 0.5)


def _release_tree(xs: np.ndarray, plan: PrivacyPlan, tree: int, *, site_id: str,
                  ledger: PrivacyLedger | None, noise: NoiseSource | None,
                  box: tuple[np.ndarray, np.ndarray] | None = None) -> ModelBank:
    """One tree of :func:`site_release`: its partition and its leaves' noised Grams."""
    n_features = xs.shape[1]
    leaves = build_partition(xs, plan.partition, ledger=ledger, noise=noise, tree=tree,
                             box=box)
    box_lo, box_hi = box if box is not None else (np.full(n_features, -0.5),
                                                  np.full(n_features, 0.5))
    los = np.array([leaf.lo for leaf in leaves]).reshape(-1, n_features)
    his = np.array([leaf.hi for leaf in leaves]).reshape(-1, n_features)
    centers, widths = 0.5 * (los + his), his - los
    grams = np.stack([augmented_gram(cell_coordinates(xs[leaf.rows], leaf.center, leaf.width))
                      for leaf in leaves]) if leaves else np.zeros((0, n_features + 1,
                                                                     n_features + 1))
    if np.isfinite(plan.rho_gram):
        if ledger is None:
            raise ValueError("a private release needs a ledger to charge")
        vec = upper_triangle(grams).ravel()
        tree_note = f", tree {tree + 1} of {plan.n_trees}" if plan.n_trees > 1 else ""
        noised = release_gaussian(
            vec, sensitivity_l2=gram_sensitivity(n_features), rho=plan.rho_gram / plan.n_trees,
            ledger=ledger, noise=noise,
            purpose=f"leaf Gram matrices ({len(leaves)} cells, {n_features} attributes"
                    f"{tree_note})",
        )
        grams = project_psd(from_upper_triangle(noised.reshape(len(leaves), -1),
                                                n_features + 1))
    # Back to the federation's coordinates: z_glob = A^-1 z_cell.
    inv = affine_map(-centers / widths, 1.0 / widths)
    grams = transform_gram(grams, inv)
    keep = grams[:, 0, 0] >= plan.min_records
    n_kept = int(keep.sum())
    prefix = f"{site_id}:" if tree == 0 else f"{site_id}:t{tree}:"
    return ModelBank(
        n_features=n_features,
        site=np.full(n_kept, site_id, dtype=object).astype(str),
        cell=np.array([f"{prefix}{number}" for number in range(n_kept)], dtype=str),
        lo=los[keep], hi=his[keep],
        gram=grams[keep], sigma=np.full(n_kept, plan.sigma_gram),
        min_records=plan.min_records, tree=np.full(n_kept, tree, dtype=np.int64),
        clip_lo=np.tile(box_lo, (n_kept, 1)), clip_hi=np.tile(box_hi, (n_kept, 1)),
    )


def assemble_bank(releases: Sequence[ModelBank], meta: dict | None = None) -> ModelBank:
    """Coordinator: gather every site's cells into the federation's bank."""
    return ModelBank.concat(list(releases), meta=meta)
