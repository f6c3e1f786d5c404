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

__all__ = ["assemble_bank", "cell_coordinates", "coded_gram_sensitivity", "refuse_unaffordable",
           "site_release"]


def coded_gram_sensitivity(n_features: int, blocks: Sequence[Sequence[int]] = ()) -> float:
    """L2 sensitivity of a leaf Gram release whose ``blocks`` are one-hot groups.

    A block is a set of columns kept in the federation's coordinates inside every cell
    (not re-centred on the cell's box) where a record has at most one non-zero entry, of
    size at most 1/2: a categorical column's indicators, or a binary code, scaled from
    public bounds [-1, 1] so that 0 stays 0 and 1 becomes 1/2
    (:func:`~fediim.impute.encoding.MixedEncoding.encoded_bounds`). In the bound of
    :func:`~fediim.privacy.gram_sensitivity`, ``sum z_i^2 <= 1 + m/4`` and
    ``sum z_i^4 <= 1 + m/16`` with one term per numeric column, a block adds at most 1/4
    and 1/16, like one numeric column, whatever its number of levels. So the release's
    sensitivity is ``gram_sensitivity(n_features - sum |block| + #blocks)``: for a table
    of m original columns, ``gram_sensitivity(m)``, below the ``gram_sensitivity(m')`` of
    its m' encoded columns treated as numbers (each indicator anywhere in [-1/2, 1/2]).
    """
    folded = sum(len(block) for block in blocks) - len(blocks)
    return gram_sensitivity(int(n_features) - folded)

def site_release(
    x: np.ndarray,
    bounds: np.ndarray,
    plan: PrivacyPlan,
    *,
    site_id: str,
    ledger: PrivacyLedger | None,
    noise: NoiseSource | None = None,
    clip_columns: np.ndarray | None = None,
    onehot_blocks: Sequence[Sequence[int]] = (),
) -> ModelBank:
    """A site's whole release: clipping box, private partition and noised leaf Gram
    matrices (see module). ``clip_columns``: public per-column flags of the columns the box
    may narrow (default all; codes must not be clipped, see
    :func:`~fediim.federated.clipping.private_clip_box`). ``onehot_blocks``: the encoded
    coded columns (see :func:`coded_gram_sensitivity`); they stay in the federation's
    coordinates inside every cell and must not be clipped.

    A site that never measures an attribute (missing in every row: a property of its
    schema, treated as public like the schema) releases over the attributes it measures,
    from its records complete on those, and its cells say so (``observed``): it still
    contributes to every pattern within them. With fewer than two measured attributes it
    releases nothing and spends nothing."""
    x = np.asarray(x, dtype=np.float64)
    refuse_unaffordable(plan, ledger, site_id)
    n_features = x.shape[1]
    measured = ~np.isnan(x).all(axis=0)
    if measured.sum() < 2:  # nothing to relate: release nothing, spend nothing
        return _empty_release(n_features, plan)
    complete = x[~np.isnan(x[:, measured]).any(axis=1)][:, measured]
    xs, _ = scale_to_bounds(complete, bounds[measured])
    clip = measured if clip_columns is None else measured & np.asarray(clip_columns, bool)
    box = site_clip_box(xs, plan, ledger=ledger, noise=noise, clip_columns=clip[measured])
    xs = clamp_to_box(xs, *box)[0]
    fixed = np.zeros(n_features, bool)
    for block in onehot_blocks:
        fixed[list(block)] = True
    parts = [_release_tree(xs, plan, tree, site_id=site_id, ledger=ledger, noise=noise,
                           box=box, sensitivity=coded_gram_sensitivity(n_features,
                                                                       onehot_blocks),
                           fixed=fixed[measured] if fixed.any() else None)
             for tree in range(plan.n_trees)]
    part = ModelBank.concat(parts) if len(parts) > 1 else parts[0]
    return part if measured.all() else embed_columns(part, measured)


def refuse_unaffordable(plan: PrivacyPlan, ledger: PrivacyLedger | None, site_id: str) -> None:
    """Refuse the whole plan up front: a release that could not be finished must not spend
    anything (a release may stop early and spend less, never more)."""
    if not np.isfinite(plan.rho_total):
        return
    if ledger is None:
        raise ValueError("a private release needs a ledger to charge")
    if not ledger.can_afford(plan.rho_total):
        raise BudgetExceeded(
            f"site {site_id!r}: this release needs rho={plan.rho_total:.6g} but only "
            f"{ledger.remaining_rho:.6g} of {ledger.rho_budget:.6g} remains; nothing "
            "was released")


def _empty_release(n_features: int, plan: PrivacyPlan) -> ModelBank:
    empty = np.zeros((0, n_features))
    return ModelBank(n_features=n_features, site=np.array([], str), cell=np.array([], str),
                     lo=empty, hi=empty, gram=np.zeros((0, n_features + 1, n_features + 1)),
                     sigma=np.zeros(0), min_records=plan.min_records)


def embed_columns(part: ModelBank, measured: np.ndarray) -> ModelBank:
    """A release over the ``measured`` attributes only, as cells over all of them: zero Gram
    rows and columns, the whole public range as box, and ``observed`` False where the site
    measures nothing."""
    n_cells, n_features = part.n_cells, len(measured)
    index = np.flatnonzero(np.concatenate([[True], measured]))
    gram = np.zeros((n_cells, n_features + 1, n_features + 1))
    gram[:, index[:, None], index[None, :]] = part.gram
    boxes = {}
    for name, fill in (("lo", -0.5), ("hi", 0.5), ("clip_lo", -0.5), ("clip_hi", 0.5)):
        boxes[name] = np.full((n_cells, n_features), fill)
        boxes[name][:, measured] = getattr(part, name)
    return ModelBank(n_features=n_features, site=part.site, cell=part.cell, gram=gram,
                     sigma=part.sigma, min_records=part.min_records, tree=part.tree,
                     observed=np.tile(measured, (n_cells, 1)), **boxes)


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
                  box: tuple[np.ndarray, np.ndarray], sensitivity: float,
                  fixed: np.ndarray | None = None) -> ModelBank:
    """One tree of :func:`site_release`: its partition inside ``box`` and its leaves'
    noised Grams. ``fixed`` columns keep the federation's coordinates in every cell.

    ``sensitivity``: the Gram release's declared L2 sensitivity, the schema's: a site
    measuring fewer attributes than the schema declares an upper bound, so its noise is
    the plan's.
    """
    n_features = xs.shape[1]
    leaves = build_partition(xs, plan.partition, ledger=ledger, noise=noise, tree=tree,
                             box=box)
    box_lo, box_hi = box
    los = np.array([leaf.lo for leaf in leaves]).reshape(-1, n_features)
    his = np.array([leaf.hi for leaf in leaves]).reshape(-1, n_features)
    centers, widths = 0.5 * (los + his), his - los
    if fixed is not None:
        centers[:, fixed], widths[:, fixed] = 0.0, 1.0
    grams = np.stack([augmented_gram(cell_coordinates(xs[leaf.rows], center, width))
                      for leaf, center, width in zip(leaves, centers, widths, strict=True)]
                     ) if leaves else np.zeros((0, n_features + 1, n_features + 1))
    if np.isfinite(plan.rho_gram):
        if ledger is None:
            raise ValueError("a private release needs a ledger to charge")
        vec = upper_triangle(grams).ravel()
        tree_note = f", tree {tree + 1} of {plan.n_trees}" if plan.n_trees > 1 else ""
        noised = release_gaussian(
            vec, sensitivity_l2=sensitivity,
            rho=plan.rho_gram / plan.n_trees,
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
