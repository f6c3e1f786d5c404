"""The federation's release under secure aggregation: every statistic a sum over sites.

Three secure sums, each of integer vectors of a public length (:class:`SecureSteps`):

1. **histograms** — per clipped column, the site's record count in each of
   :data:`HISTOGRAM_BINS` public bins of [-1/2, 1/2]; the coordinator reads the
   federation's clipping box off the summed noisy histograms (:func:`box_from_histograms`);
   or, when the plan asks for ``principal_axes``, **moments** — the site's augmented Gram
   of all its complete records; the coordinator reads the public principal-axis frame off
   the sum (:mod:`~fediim.federated.principal`), and the next two sums are formed in it;
2. **counts** — every node of the complete public tree inside that box
   (:mod:`~fediim.federated.global_partition`); the coordinator prunes it
   (:func:`trees_from_counts`);
3. **grams** — each leaf's Gram matrix in the leaf's own coordinates, quantised
   (:data:`QUANT_SCALE`); the coordinator maps the sums back into one bank whose every cell
   is a sum over sites (:func:`bank_from_grams`).

Each site adds its share of distributed discrete Gaussian noise
(:func:`~fediim.privacy.distributed.release_distributed`): the *sum* is ρ-zCDP as long as
it holds the noise of at least ``threshold`` sites, the assumption every ledger entry
records. The masking that hides each site's share from the coordinator is the protocol
layer's (:mod:`fediim.protocol`); in one process the shares are simply added
(:func:`plain_sum`), which is what the unmasked secure sum returns exactly.

A site that never measures an attribute contributes zero vectors (its rows are not
released), but its noise still counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fediim.federated.bank import ModelBank
from fediim.federated.clipping import CLIP_QUANTILES, clamp_to_box, widen_box
from fediim.federated.global_partition import (
    GlobalTree,
    leaf_of_rows,
    n_nodes,
    node_counts,
    prune_tree,
)
from fediim.federated.gram import (
    affine_map,
    augmented_upper_size,
    from_upper_triangle,
    project_psd,
    transform_gram,
)
from fediim.federated.plan import PrivacyPlan, scale_to_bounds
from fediim.federated.principal import Frame, frame_from_moments, moments_upper
from fediim.federated.release import (
    cell_coordinates,
    coded_gram_sensitivity,
    refuse_unaffordable,
)
from fediim.privacy import PrivacyLedger
from fediim.privacy.distributed import (
    ddg_sigma,
    quantise,
    quantised_sensitivity,
    release_distributed,
)

__all__ = ["AGGREGATIONS", "HISTOGRAM_BINS", "MAX_SITE_RECORDS", "MIN_SECURE_SITES",
           "QUANT_SCALE", "SECURE_SITE", "SecureSettings", "SecureSteps", "SiteShares",
           "SumOf", "SummedRelease", "bank_from_grams", "box_from_histograms",
           "default_threshold", "gram_sum_sigma", "histogram_sum_sigma",
           "moments_sensitivity", "moments_sum_sigma", "plain_sum",
           "secure_bank", "summed_release", "tree_depth", "trees_from_counts"]

#: The bank's site id for every cell of a securely summed bank: no cell is one site's.
SECURE_SITE = "federation"
#: Public bins per column of the clipping histograms.
HISTOGRAM_BINS = 32
#: Gram entries are sent as round(value * QUANT_SCALE); rounding moves each by at most
#: 1 / (2 * QUANT_SCALE), far below any noise, and adds sqrt(#entries) to the integer
#: sensitivity (:func:`~fediim.privacy.distributed.quantised_sensitivity`).
QUANT_SCALE = 2.0**16
#: The public cap on one site's records under secure aggregation: with it, no sum of
#: quantised entries can leave the protocol's headroom.
MAX_SITE_RECORDS = 2**32
#: Deepest complete tree whose counts are released (2**(D+1) - 1 counts per tree).
MAX_SECURE_DEPTH = 18
#: A clipping box pays when each tail quantile's rank is this many times the noise of a
#: cumulative count over the bins.
HISTOGRAM_MIN_RATIO = 1.0


#: How sites combine their statistics: each releases its own cells (``per-site``), or
#: all sum them securely (``secure``); ``auto`` sums securely from
#: :data:`MIN_SECURE_SITES` sites on.
AGGREGATIONS = ("per-site", "secure", "auto")
MIN_SECURE_SITES = 3


#: Groups of encoded columns, one per binary or categorical column (its one-hot block).
Blocks = Sequence[Sequence[int]]


def default_threshold(n_sites: int) -> int:
    """Sites whose noise every sum must hold: two thirds of them (at least 2), so a third
    may drop out or collude."""
    return max(2, math.ceil(2 * n_sites / 3))


@dataclass(frozen=True)
class SecureSettings:
    """Who sums (public): ``n_sites`` sites, every sum recovered from at least
    ``threshold`` of them, so it holds at least ``threshold`` sites' noise."""

    n_sites: int
    threshold: int

    def __post_init__(self) -> None:
        if not 2 <= self.threshold <= self.n_sites:
            raise ValueError(f"secure aggregation needs 2 <= threshold <= sites, got "
                             f"threshold {self.threshold} of {self.n_sites} sites")

    @property
    def assumption(self) -> str:
        """The trust assumption a ledger entry records for a distributed release."""
        return (f"secure aggregation over {self.n_sites} sites, threshold {self.threshold}:"
                " honest-but-curious coordinator; every released sum holds the noise of at "
                f"least {self.threshold} sites (at most {self.n_sites - self.threshold} "
                "colluding or dropped)")


@dataclass(frozen=True)
class SecureSteps:
    """The public shape of the three sums: their order and their privacy budgets."""

    rho_histograms: float
    rho_counts: float
    rho_grams: float
    #: The first sum is the moments (the principal-axis frame), not the histograms; it
    #: spends ``rho_histograms``.
    principal_axes: bool = False

    @classmethod
    def from_plan(cls, plan: PrivacyPlan) -> SecureSteps:
        if not math.isfinite(plan.rho_total):  # exact statistics are never clipped
            return cls(0.0, math.inf, math.inf)
        return cls(plan.rho_clip, plan.rho_total - plan.rho_gram - plan.rho_clip,
                   plan.rho_gram, plan.principal_axes)

    def clips(self, clip_columns: np.ndarray) -> bool:
        """Whether the first sum (the clipping histograms or the moments) takes place."""
        return self.rho_histograms > 0 and bool(np.any(clip_columns))

    def first_statistic(self, clip_columns: np.ndarray) -> str | None:
        """The first sum's statistic: "moments", "histograms", or None (no first sum)."""
        if not self.clips(clip_columns):
            return None
        return "moments" if self.principal_axes else "histograms"


def _sum_sigma(sensitivity: float, rho: float, settings: SecureSettings, dimension: int,
               n_summands: int) -> float:
    """Noise std of a sum of ``n_summands`` shares (0 for exact statistics)."""
    if not math.isfinite(rho):
        return 0.0
    site = ddg_sigma(sensitivity, rho, settings.threshold, dimension)
    return site * math.sqrt(n_summands)


def histogram_sum_sigma(steps: SecureSteps, settings: SecureSettings,
                        clip_columns: np.ndarray, n_summands: int) -> float:
    """Noise std of the summed histograms (sum 1) over ``n_summands`` sites."""
    n_clipped = int(np.sum(clip_columns))
    return _sum_sigma(histogram_sensitivity(n_clipped), steps.rho_histograms, settings,
                      n_clipped * HISTOGRAM_BINS, n_summands)


def gram_sum_sigma(steps: SecureSteps, settings: SecureSettings,
                   trees: Sequence[GlobalTree], n_summands: int,
                   onehot_blocks: Blocks = ()) -> float:
    """Noise std (integer units) of the summed leaf Grams (sum 3) over ``n_summands``
    sites: the bank's σ is this over :data:`QUANT_SCALE`."""
    n_features = len(trees[0].box[0])
    size = sum(len(t.leaves) for t in trees) * augmented_upper_size(n_features)
    return _sum_sigma(gram_share_sensitivity(n_features, len(trees), onehot_blocks),
                      steps.rho_grams, settings, size, n_summands)


def moments_sum_sigma(steps: SecureSteps, settings: SecureSettings, n_features: int,
                      n_summands: int, onehot_blocks: Blocks = ()) -> float:
    """Noise std (integer units) of the summed moments (sum 1 with ``principal_axes``)."""
    return _sum_sigma(moments_sensitivity(n_features, onehot_blocks), steps.rho_histograms,
                      settings, augmented_upper_size(n_features), n_summands)


def moments_sensitivity(n_features: int, onehot_blocks: Blocks = ()) -> float:
    """A record adds its augmented Gram upper triangle in the public bounds' coordinates
    (every entry in [-1/2, 1/2]), quantised: one leaf Gram's sensitivity
    (:func:`gram_share_sensitivity` of one tree)."""
    return gram_share_sensitivity(n_features, 1, onehot_blocks)


def histogram_sensitivity(n_columns: int) -> float:
    """A record adds one to one bin of each clipped column."""
    return math.sqrt(n_columns)


def count_sensitivity(depth: int, n_trees: int) -> float:
    """A record adds one to one node per depth per tree."""
    return math.sqrt(n_trees * (depth + 1))


def gram_share_sensitivity(n_features: int, n_trees: int,
                           onehot_blocks: Blocks = ()) -> float:
    """A record's Gram upper triangle, once per tree, quantised (the integer vector's L2
    sensitivity; the rounding of each of its entries moves it by at most 1/2, counted as 1
    by :func:`~fediim.privacy.distributed.quantised_sensitivity`). One-hot blocks (kept
    in public coordinates in every leaf) count as one column each
    (:func:`~fediim.federated.release.coded_gram_sensitivity`)."""
    entries = augmented_upper_size(n_features)
    sensitivity = coded_gram_sensitivity(n_features, onehot_blocks)
    return quantised_sensitivity(math.sqrt(n_trees) * sensitivity, QUANT_SCALE,
                                 n_trees * entries)


def fixed_columns(n_features: int, onehot_blocks: Blocks) -> np.ndarray:
    """Which columns keep the federation's coordinates in every leaf (the one-hot
    blocks' columns)."""
    fixed = np.zeros(n_features, bool)
    for block in onehot_blocks:
        fixed[list(block)] = True
    return fixed


def leaf_frames(lo: np.ndarray, hi: np.ndarray, fixed: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Each leaf's centre and width, the ``fixed`` columns at centre 0 and width 1."""
    centers, widths = 0.5 * (lo + hi), hi - lo
    centers[:, fixed], widths[:, fixed] = 0.0, 1.0
    return centers, widths


@dataclass
class SiteShares:
    """One site's side: its records as released, and its noised share of each sum."""

    rows: np.ndarray  # complete records, scaled into the public bounds (clamped later)
    plan: PrivacyPlan
    settings: SecureSettings
    clip_columns: np.ndarray
    site_id: str
    ledger: PrivacyLedger | None
    noise: object | None = None
    #: The encoded coded columns (one-hot blocks, binary codes): never clipped, kept in
    #: public coordinates in every leaf (see :func:`gram_share_sensitivity`).
    onehot_blocks: Blocks = ()

    @classmethod
    def from_table(cls, x: np.ndarray, bounds: np.ndarray, plan: PrivacyPlan,
                   settings: SecureSettings, *, site_id: str, ledger: PrivacyLedger | None,
                   noise: object | None = None,
                   clip_columns: np.ndarray | None = None,
                   onehot_blocks: Blocks = ()) -> SiteShares:
        """The site's complete rows (none if it never measures some attribute), after
        refusing up front a plan its budget cannot pay in full. ``onehot_blocks`` must
        not be among ``clip_columns``."""
        x = np.asarray(x, dtype=np.float64)
        refuse_unaffordable(plan, ledger, site_id)
        if len(x) > MAX_SITE_RECORDS:
            raise ValueError(f"site {site_id!r}: more than {MAX_SITE_RECORDS} records")
        complete = x[~np.isnan(x).any(axis=1)]
        rows, _ = scale_to_bounds(complete, bounds)
        clip = (np.ones(x.shape[1], bool) if clip_columns is None
                else np.asarray(clip_columns, bool))
        blocks = tuple(tuple(int(c) for c in block) for block in onehot_blocks)
        if clip[fixed_columns(x.shape[1], blocks)].any():
            raise ValueError("coded (one-hot) columns must not be clipped")
        return cls(rows, plan, settings, clip, site_id, ledger, noise, blocks)

    def _release(self, values: np.ndarray, sensitivity: float, rho: float,
                 purpose: str) -> np.ndarray:
        values = np.asarray(values, dtype=np.int64)
        if not math.isfinite(rho):
            return values
        if self.ledger is None:
            raise ValueError("a private release needs a ledger to charge")
        return release_distributed(values, sensitivity_l2=sensitivity, rho=rho,
                                   n_summands=self.settings.threshold, ledger=self.ledger,
                                   purpose=purpose, assumption=self.settings.assumption,
                                   noise=self.noise)

    def share(self, statistic: str, steps: SecureSteps,
              box: tuple[np.ndarray, np.ndarray] | None, depth: int | None,
              trees: Sequence[GlobalTree], frame: Frame | None = None) -> np.ndarray:
        """The site's noised share of ``statistic`` ("histograms", "moments", "counts" or
        "grams") over the public state the coordinator sent (box and depth for the counts,
        the trees for the Grams, the frame both are formed in if any)."""
        if statistic == "histograms":
            return self.histograms(steps)
        if statistic == "moments":
            return self.moments(steps)
        framed = self if frame is None else replace(self, rows=frame.to_frame(self.rows))
        if statistic == "counts":
            assert box is not None and depth is not None
            return framed.counts(steps, box, int(depth))
        if statistic == "grams":
            return framed.grams(steps, trees)
        raise ValueError(f"unknown secure statistic {statistic!r}")

    def moments(self, steps: SecureSteps) -> np.ndarray:
        """Sum 1 with ``principal_axes``: the augmented Gram upper triangle of all the
        site's complete records in the public bounds' coordinates, quantised record by
        record (a record then moves the sum by exactly its own quantised Gram)."""
        n_features = self.rows.shape[1]
        values = (quantise(moments_upper(self.rows), QUANT_SCALE).sum(axis=0) if len(self.rows)
                  else np.zeros(augmented_upper_size(n_features), np.int64))
        return self._release(values, moments_sensitivity(n_features, self.onehot_blocks),
                             steps.rho_histograms,
                             f"secure sum 1: moments (augmented Gram of all records, "
                             f"{n_features} attributes)")

    def histograms(self, steps: SecureSteps) -> np.ndarray:
        """Sum 1: per clipped column, counts in the public bins (flat, int64)."""
        columns = np.flatnonzero(self.clip_columns)
        edges = np.linspace(-0.5, 0.5, HISTOGRAM_BINS + 1)
        counts = [np.histogram(self.rows[:, column], bins=edges)[0] for column in columns]
        flat = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        return self._release(flat, histogram_sensitivity(len(columns)), steps.rho_histograms,
                             f"secure sum 1: column histograms ({len(columns)} columns)")

    def counts(self, steps: SecureSteps, box: tuple[np.ndarray, np.ndarray],
               depth: int) -> np.ndarray:
        """Sum 2: counts in every node of each tree's complete tree inside ``box``."""
        rows = clamp_to_box(self.rows, *box)[0]
        vector = np.concatenate([node_counts(rows, box, depth, tree)
                                 for tree in range(self.plan.n_trees)])
        return self._release(vector, count_sensitivity(depth, self.plan.n_trees),
                             steps.rho_counts,
                             f"secure sum 2: partition counts (depth {depth}, "
                             f"{self.plan.n_trees} tree(s))")

    def grams(self, steps: SecureSteps, trees: Sequence[GlobalTree]) -> np.ndarray:
        """Sum 3: every leaf's Gram upper triangle in its own coordinates, quantised."""
        n_features = self.rows.shape[1]
        fixed = fixed_columns(n_features, self.onehot_blocks)
        vector = np.concatenate([
            _leaf_grams(clamp_to_box(self.rows, *tree.box)[0], tree, fixed).ravel()
            for tree in trees])
        n_leaves = sum(len(tree.leaves) for tree in trees)
        sensitivity = gram_share_sensitivity(n_features, len(trees), self.onehot_blocks)
        coded = (f", {len(self.onehot_blocks)} one-hot block(s) counted as one column each"
                 if self.onehot_blocks else "")
        return self._release(vector, sensitivity, steps.rho_grams,
                             f"secure sum 3: leaf Gram matrices ({n_leaves} cells, "
                             f"{n_features} attributes{coded})")


def _leaf_grams(rows: np.ndarray, tree: GlobalTree, fixed: np.ndarray) -> np.ndarray:
    """Each leaf's augmented Gram upper triangle of ``rows`` in the leaf's own
    coordinates (``fixed`` columns in the federation's), quantised record by record and
    summed in integers, shape (n_leaves, k): a record then moves its leaf's sum by exactly
    its own quantised Gram."""
    lo, hi = tree.boxes()
    n_leaves, n_features = lo.shape
    sums = np.zeros((n_leaves, augmented_upper_size(n_features)), dtype=np.int64)
    if len(rows):
        leaf = leaf_of_rows(rows, tree)
        centers, widths = leaf_frames(lo, hi, fixed)
        local = cell_coordinates(rows, centers[leaf], widths[leaf])
        np.add.at(sums, leaf, quantise(moments_upper(local), QUANT_SCALE))
    return sums


# ---- the coordinator's post-processing of the sums ---------------------------------------

def box_from_histograms(total: np.ndarray, n_features: int, clip_columns: np.ndarray,
                        noise_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The federation's clipping box from summed histograms.

    Each clipped column's quantiles :data:`CLIP_QUANTILES` are read off the noisy
    cumulative histogram (linear within a bin) and widened
    (:func:`~fediim.federated.clipping.widen_box`). The box is the public one when the
    noisy total says the tail ranks would drown in the cumulative noise
    (:data:`HISTOGRAM_MIN_RATIO`)."""
    lo, hi = np.full(n_features, -0.5), np.full(n_features, 0.5)
    columns = np.flatnonzero(clip_columns)
    if not columns.size:
        return lo, hi
    hist = np.maximum(np.asarray(total, np.float64).reshape(len(columns), HISTOGRAM_BINS), 0)
    n_noisy = float(np.median(hist.sum(axis=1)))
    tail = min(min(q, 1 - q) for q in CLIP_QUANTILES)
    if tail * n_noisy < HISTOGRAM_MIN_RATIO * noise_sigma * math.sqrt(HISTOGRAM_BINS):
        return lo, hi
    edges = np.linspace(-0.5, 0.5, HISTOGRAM_BINS + 1)
    for row, column in zip(hist, columns, strict=True):
        cumulative = np.concatenate([[0.0], np.cumsum(row)])
        q_lo, q_hi = (np.interp(q * cumulative[-1], cumulative, edges)
                      for q in CLIP_QUANTILES)
        wide_lo, wide_hi = widen_box(np.array([q_lo]), np.array([q_hi]))
        lo[column], hi[column] = wide_lo[0], wide_hi[0]
    return lo, hi


def tree_depth(plan: PrivacyPlan) -> int:
    """The complete tree's depth: the plan's cap, at most :data:`MAX_SECURE_DEPTH`.

    Public cuts halve empty space as readily as data, so a cell around concentrated
    records sits many halvings down; the noisy counts, not the depth, stop the splits."""
    return int(min(plan.partition.max_depth, MAX_SECURE_DEPTH))


def trees_from_counts(total: np.ndarray, plan: PrivacyPlan, box: tuple[np.ndarray, np.ndarray],
                      depth: int) -> list[GlobalTree]:
    """The pruned trees the summed noisy counts call for."""
    counts = np.asarray(total, np.float64).reshape(plan.n_trees, n_nodes(depth))
    return [GlobalTree(box, depth, tree, prune_tree(
        counts[tree], depth, split_threshold=plan.partition.split_threshold,
        min_records=plan.partition.min_records)) for tree in range(plan.n_trees)]


def bank_from_grams(total: np.ndarray, trees: Sequence[GlobalTree], plan: PrivacyPlan,
                    noise_sigma: float, meta: dict, onehot_blocks: Blocks = (),
                    frame: Frame | None = None) -> ModelBank:
    """The bank: each leaf's summed Gram, de-quantised, projected PSD, mapped back to the
    federation's coordinates (from the leaves' frames, ``onehot_blocks`` fixed, then out
    of the principal-axis ``frame`` if the trees were cut in one: the cells' boxes stay in
    it and the bank's ``meta["frame"]`` records it); cells whose noisy count is below
    ``min_records`` dropped. ``noise_sigma``: the sum's noise std in integer units."""
    n_features = len(trees[0].box[0])
    size = augmented_upper_size(n_features)
    values = np.asarray(total, np.float64).reshape(-1, size) / QUANT_SCALE
    grams = project_psd(from_upper_triangle(values, n_features + 1))
    # The projection may nudge a count down by rounding; raising a diagonal entry keeps
    # the matrix PSD, and the released count is what decides which cells stay.
    grams[:, 0, 0] = np.maximum(grams[:, 0, 0], values[:, 0])
    boxes = [tree.boxes() for tree in trees]
    lo, hi = np.vstack([b[0] for b in boxes]), np.vstack([b[1] for b in boxes])
    centers, widths = leaf_frames(lo, hi, fixed_columns(n_features, onehot_blocks))
    grams = transform_gram(grams, affine_map(-centers / widths, 1.0 / widths))
    if frame is not None:
        grams = frame.gram_back(grams)
        meta = {**meta, "frame": frame.to_meta()}
    tree_of = np.concatenate([np.full(len(t.leaves), t.tree) for t in trees])
    leaf_ids = np.concatenate([t.leaves for t in trees])
    keep = grams[:, 0, 0] >= plan.min_records
    n_kept = int(keep.sum())
    box_lo, box_hi = trees[0].box
    return ModelBank(
        n_features=n_features, site=np.full(n_kept, SECURE_SITE).astype(str),
        cell=np.array([f"{SECURE_SITE}:t{t}:{leaf}" for t, leaf in
                       zip(tree_of[keep], leaf_ids[keep], strict=True)], dtype=str),
        lo=lo[keep], hi=hi[keep], gram=grams[keep],
        sigma=np.full(n_kept, noise_sigma / QUANT_SCALE), min_records=plan.min_records,
        meta=dict(meta), tree=tree_of[keep].astype(np.int64),
        clip_lo=np.tile(box_lo, (n_kept, 1)), clip_hi=np.tile(box_hi, (n_kept, 1)))


# ---- the three sums in order --------------------------------------------------------------

#: One secure sum as the coordinator runs it: (statistic, box, depth, trees, frame) -> (sum,
#: its survivors). Box and depth are None for the first sum; trees are empty but for the
#: Grams; the frame is None unless the plan cuts along principal axes.
SumOf = Callable[[str, tuple[np.ndarray, np.ndarray] | None, int | None,
                  Sequence[GlobalTree], Frame | None], tuple[np.ndarray, Sequence[str]]]


@dataclass(frozen=True)
class SummedRelease:
    """What the three sums leave the coordinator: the trees, the summed leaf Grams (integer
    units), the sites in that last sum and its noise std (integer units)."""

    trees: list[GlobalTree]
    grams: np.ndarray
    survivors: list[str]
    noise_sigma: float
    onehot_blocks: Blocks = ()
    frame: Frame | None = None

    def bank(self, plan: PrivacyPlan, settings: SecureSettings, meta: dict) -> ModelBank:
        """The federation's bank (:func:`bank_from_grams`); ``meta`` adds to S, t and the
        survivors."""
        return bank_from_grams(self.grams, self.trees, plan, self.noise_sigma, {
            "aggregation": "secure", "sites": settings.n_sites,
            "threshold": settings.threshold, "survivors": sorted(self.survivors), **meta},
            self.onehot_blocks, self.frame)


def summed_release(plan: PrivacyPlan, settings: SecureSettings, clip_columns: np.ndarray,
                   sum_of: SumOf, onehot_blocks: Blocks = ()) -> SummedRelease:
    """The coordinator's side of the three sums, in order, each over the public state the
    previous one left: the clipping box or the principal-axis frame (if the plan has a
    first sum), the pruned trees, the Grams. ``sum_of`` runs one sum (in one process, or
    through the secure-sum protocol)."""
    steps = SecureSteps.from_plan(plan)
    n_features = len(clip_columns)
    box = (np.full(n_features, -0.5), np.full(n_features, 0.5))
    first, frame = steps.first_statistic(clip_columns), None
    if first == "histograms":
        total, survivors = sum_of("histograms", None, None, (), None)
        box = box_from_histograms(total, n_features, clip_columns, histogram_sum_sigma(
            steps, settings, clip_columns, len(survivors)))
    elif first == "moments":
        total, survivors = sum_of("moments", None, None, (), None)
        sigma = moments_sum_sigma(steps, settings, n_features, len(survivors), onehot_blocks)
        frame = frame_from_moments(np.asarray(total, np.float64) / QUANT_SCALE, n_features,
                                   ~np.asarray(clip_columns, bool), sigma / QUANT_SCALE)
    depth = tree_depth(plan)
    total, _ = sum_of("counts", box, depth, (), frame)
    trees = trees_from_counts(total, plan, box, depth)
    total, survivors = sum_of("grams", box, depth, trees, frame)
    return SummedRelease(trees, total, list(survivors),
                         gram_sum_sigma(steps, settings, trees, len(survivors), onehot_blocks),
                         onehot_blocks, frame)


# ---- in one process ----------------------------------------------------------------------

#: Adds the sites' shares of one sum: (step name, {site id: share}) -> (sum, survivors).
Aggregate = Callable[[str, Mapping[str, np.ndarray]], tuple[np.ndarray, list[str]]]


def plain_sum(step: str, shares: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """The sum the secure protocol unmasks, computed directly (one process, no coordinator
    to hide shares from)."""
    del step
    vectors = list(shares.values())
    return np.sum(np.stack(vectors), axis=0, dtype=np.int64), list(shares)


def secure_bank(sites: Mapping[str, SiteShares], plan: PrivacyPlan,
                settings: SecureSettings, *, aggregate: Aggregate = plain_sum) -> ModelBank:
    """Run the three sums over ``sites`` and build the federation's bank."""
    steps = SecureSteps.from_plan(plan)
    alive = list(sites)

    def sum_of(statistic: str, box: tuple[np.ndarray, np.ndarray] | None, depth: int | None,
               trees: Sequence[GlobalTree], frame: Frame | None
               ) -> tuple[np.ndarray, list[str]]:
        nonlocal alive
        total, alive = aggregate(statistic, {
            site: sites[site].share(statistic, steps, box, depth, trees, frame)
            for site in alive})
        return total, alive

    first = next(iter(sites.values()))
    return summed_release(plan, settings, first.clip_columns, sum_of,
                          first.onehot_blocks).bank(plan, settings, {})
