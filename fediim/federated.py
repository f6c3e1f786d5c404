"""Private federated IIM, in-process: site-side and coordinator-side steps as plain functions.

The steps are message-shaped so the Flower apps can carry exactly these over the wire:

1. ``site_release`` (site): scale complete records into the public bounds, build the private
   partition (noisy counts, charged), release every leaf's Gram matrix in the leaf's own
   coordinates with the Gaussian mechanism (charged to the site's ledger *before* noise is
   drawn), map back, drop cells whose noisy count is below ``min_records``. Returns the
   site's cells as a :class:`~fediim.bank.ModelBank`.
2. ``assemble_bank`` (coordinator): concatenate the sites' cells into one bank.
3. ``site_impute`` (site): impute the site's own incomplete rows from the bank, locally;
   ``hybrid`` adds the site's exact local IIM candidates to the vote.

Privacy unit: one record at one site. A site's total spend is ``rho_counts`` (one count
release per tree depth, parallel within a depth) plus ``rho_gram`` (one Gram release over
disjoint leaves, parallel composition), all in rho-zCDP and recorded in its ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fediim.bank import BankConfig, BankError, CellPatternModels, ModelBank
from fediim.gram import (
    affine_map,
    augmented_gram,
    from_upper_triangle,
    project_psd,
    transform_gram,
    upper_triangle,
)
from fediim.iim import IIMConfig, PatternModels
from fediim.imputer import METHOD_IIM, METHOD_MEAN, IIMImputer, ImputationResult
from fediim.partition import PartitionPlan, build_partition
from fediim.privacy import (
    BudgetExceeded,
    NoiseSource,
    PrivacyLedger,
    SeededGaussianNoise,
    epsilon_to_rho,
    gaussian_sigma,
    gram_sensitivity,
    release_gaussian,
)

__all__ = [
    "PrivacyPlan",
    "plan_privacy",
    "scale_to_bounds",
    "site_release",
    "assemble_bank",
    "site_impute",
    "FederatedIIM",
]

Mode = Literal["hybrid", "federated", "local", "mean"]


@dataclass(frozen=True)
class PrivacyPlan:
    """How one site's budget is spent (all public).

    rho_total : the site's budget for this fit, rho-zCDP.
    rho_gram : spent on the leaf Gram matrices (one release, disjoint leaves).
    partition : the tree's public parameters (per-depth count budget, threshold, depth cap).
    sigma_gram : Gaussian noise std of each Gram entry, in the leaf's own coordinates.
    """

    rho_total: float
    rho_gram: float
    partition: PartitionPlan
    sigma_gram: float
    min_records: int


def plan_privacy(
    epsilon: float,
    delta: float,
    n_features: int,
    *,
    min_records: int = 10,
    count_fraction: float = 0.1,
    max_depth: int = 16,
    cell_noise_ratio: float = 4.0,
) -> PrivacyPlan:
    """Split a site's (epsilon, delta) into the tree's counts and the leaves' Gram matrices.

    A cell is split while its noisy count exceeds ``2 * max(min_records, cell_noise_ratio *
    sigma_gram)``: each child should still hold enough records for its Gram matrix to carry
    signal above the noise (within-cell second moments grow like n/12 per attribute in the
    cell's coordinates, the noise like sigma_gram).
    """
    if not 0 < count_fraction < 1:
        raise ValueError(f"count_fraction must be in (0, 1), got {count_fraction}")
    if min_records < 1:
        raise ValueError(f"min_records must be >= 1, got {min_records}")
    if np.isinf(epsilon):
        part = PartitionPlan(max_depth, np.inf, 2.0 * min_records, min_records)
        return PrivacyPlan(np.inf, np.inf, part, 0.0, min_records)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 (or inf), got {epsilon}")
    rho = epsilon_to_rho(epsilon, delta)
    rho_counts = count_fraction * rho
    rho_gram = rho - rho_counts
    sigma = gaussian_sigma(gram_sensitivity(n_features), rho_gram)
    threshold = 2.0 * max(min_records, cell_noise_ratio * sigma)
    part = PartitionPlan(max_depth, rho_counts / (max_depth + 1), threshold, min_records)
    return PrivacyPlan(rho, rho_gram, part, sigma, min_records)


def scale_to_bounds(x: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map each attribute's public bounds to [-1/2, 1/2], clamping; returns (scaled, n_clamped).

    NaN stays NaN. Clamping is what makes the sensitivity bound hold.
    """
    lo, hi = bounds[:, 0], bounds[:, 1]
    s = (x - lo) / (hi - lo) - 0.5
    with np.errstate(invalid="ignore"):
        clamped = np.sum((s < -0.5) | (s > 0.5), axis=0)
    return np.clip(s, -0.5, 0.5), clamped


def unscale(values: np.ndarray, bounds: np.ndarray, cols: np.ndarray | int) -> np.ndarray:
    """Inverse of :func:`scale_to_bounds` for column(s) ``cols``."""
    lo, hi = bounds[cols, 0], bounds[cols, 1]
    return (values + 0.5) * (hi - lo) + lo


def site_release(
    x: np.ndarray,
    bounds: np.ndarray,
    plan: PrivacyPlan,
    *,
    site_id: str,
    ledger: PrivacyLedger | None,
    noise: NoiseSource | None = None,
) -> ModelBank:
    """A site's whole release: private partition + noised leaf Gram matrices (see module)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.shape[1]
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
    leaves = build_partition(xs, plan.partition, ledger=ledger, noise=noise)
    centers = np.array([lf.center for lf in leaves]).reshape(-1, m)
    widths = np.array([lf.width for lf in leaves]).reshape(-1, m)
    grams = np.stack([
        augmented_gram((xs[lf.rows] - lf.center) / lf.width) for lf in leaves
    ]) if leaves else np.zeros((0, m + 1, m + 1))
    if np.isfinite(plan.rho_gram):
        if ledger is None:
            raise ValueError("a private release needs a ledger to charge")
        vec = upper_triangle(grams).ravel()
        noised = release_gaussian(
            vec, sensitivity_l2=gram_sensitivity(m), rho=plan.rho_gram, ledger=ledger,
            purpose=f"leaf Gram matrices ({len(leaves)} cells, {m} attributes)", noise=noise,
        )
        grams = project_psd(from_upper_triangle(noised.reshape(len(leaves), -1), m + 1))
    # Back to the federation's coordinates: z_glob = A^-1 z_cell.
    inv = affine_map(-centers / widths, 1.0 / widths)
    grams = transform_gram(grams, inv)
    keep = grams[:, 0, 0] >= plan.min_records
    n = int(keep.sum())
    return ModelBank(
        n_features=m,
        site=np.full(n, site_id, dtype=object).astype(str),
        cell=np.array([f"{site_id}:{i}" for i in range(n)], dtype=str),
        lo=centers[keep] - widths[keep] / 2, hi=centers[keep] + widths[keep] / 2,
        gram=grams[keep], sigma=np.full(n, plan.sigma_gram), min_records=plan.min_records,
    )


def assemble_bank(releases: Sequence[ModelBank], meta: dict | None = None) -> ModelBank:
    """Coordinator: gather every site's cells into the federation's bank."""
    return ModelBank.concat(list(releases), meta=meta)


def site_impute(
    x: np.ndarray,
    bank: ModelBank | None,
    bounds: np.ndarray,
    *,
    mode: Mode = "hybrid",
    n_neighbors: int = 10,
    bank_config: BankConfig | None = None,
    site_id: str | None = None,
    n_validation: int = 400,
) -> ImputationResult:
    """Impute a site's incomplete rows locally (queries never leave the site).

    ``federated``: bank candidates only; ``local``: the site's own IIM only; ``mean``: the
    federation-wide mean read off the bank; ``hybrid``: a blend
    ``lam * local + (1 - lam) * federated`` per pattern, with ``lam`` in {0, 0.1, .., 1}
    chosen on the site's own complete rows (up to ``n_validation`` of them, each imputed
    without itself, the federated side from the *other* sites' cells so the site's own
    records do not flatter it). ``lam = 1`` is on the grid and wins ties, so hybrid loses
    to local only by validation noise. (Requiring the gain to exceed one standard error
    made hybrid equal local everywhere in the benchmark, giving up the gains on ccpp
    non-IID and wine; see benchmarks/README.md.)
    """
    x = np.asarray(x, dtype=np.float64)
    if mode == "local":
        return IIMImputer(n_neighbors=n_neighbors).fit(x).impute(x)
    if bank is None:
        raise ValueError(f"mode {mode!r} needs a model bank")
    if bank.n_cells == 0:
        raise BankError(f"mode {mode!r}: the model bank holds no cells (every site had "
                        f"fewer than {bank.min_records} complete records per cell); use "
                        "mode='local' or gather more sites")
    cfg = bank_config or BankConfig(n_neighbors=n_neighbors)
    n, m = x.shape
    miss = np.isnan(x)
    xs, _ = scale_to_bounds(x, bounds)
    out = x.copy()
    unc = np.full((n, m), np.nan)
    method = np.full((n, m), "", dtype=object)
    ell = np.full((n, m), np.nan)
    ncand = np.zeros((n, m), dtype=np.int64)
    pooled = bank.pooled_gram()
    fed_mean = pooled[0, 1:] / max(pooled[0, 0], 1.0)
    # The local side standardises with the site's own spread, exactly as local mode does
    # (its data never leaves, so nothing here is private); the bank side uses its own.
    with np.errstate(invalid="ignore"):
        sd = np.nanstd(xs, axis=0)
        mu = np.nanmean(xs, axis=0)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    mu = np.where(np.isfinite(mu), mu, 0.0)
    zs = (xs - mu) / sd
    rows = np.flatnonzero(miss.any(axis=1))
    if rows.size == 0:
        return ImputationResult(out, miss, unc, method, ell, ncand)
    pats, inverse = np.unique(miss[rows], axis=0, return_inverse=True)
    local_cfg = IIMConfig(n_neighbors=n_neighbors)
    # The blend is validated against the *other* sites' cells, so the site's own records
    # do not flatter the federated side.
    others = bank.select(bank.site != site_id) if site_id is not None else bank
    for p, pat in enumerate(pats):
        r = rows[inverse.ravel() == p]
        feats = tuple(int(c) for c in np.flatnonzero(~pat))
        for a in (int(c) for c in np.flatnonzero(pat)):
            if mode == "mean" or not feats:
                out[r, a] = unscale(fed_mean[a], bounds, a)
                unc[r, a] = 0.0
                method[r, a] = METHOD_MEAN
                continue
            q = xs[np.ix_(r, list(feats))]
            fed = CellPatternModels(bank, a, feats, cfg).impute(q)
            val, spread, ells, n_c = fed.values, fed.spread, fed.ell.mean(axis=1), fed.ell.shape[1]
            train = (~miss[:, list(feats)]).all(axis=1) & ~miss[:, a]
            if mode == "hybrid" and train.sum() > 1:
                fz = list(feats)
                local = PatternModels(zs[np.ix_(train, fz)], zs[train, a], local_cfg)
                loc = local.impute(zs[np.ix_(r, fz)])
                loc_val = loc.values * sd[a] + mu[a]
                lam = _blend_weight(local, zs[np.ix_(train, fz)], xs[np.ix_(train, fz)],
                                    xs[train, a], (mu[a], sd[a]), others, a, feats, cfg,
                                    n_validation)
                mix = lam * loc_val + (1 - lam) * val
                loc_spread = loc.spread * sd[a]
                spread = np.sqrt(lam * loc_spread**2 + (1 - lam) * spread**2
                                 + lam * (1 - lam) * (loc_val - val) ** 2)
                ells = lam * loc.ell.mean(axis=1) + (1 - lam) * ells
                n_c += loc.ell.shape[1]
                val = mix
            out[r, a] = unscale(val, bounds, a)
            unc[r, a] = spread * (bounds[a, 1] - bounds[a, 0])
            method[r, a] = METHOD_IIM
            ell[r, a] = ells
            ncand[r, a] = n_c
    return ImputationResult(out, miss, unc, method, ell, ncand)


_BLEND_GRID = np.linspace(1.0, 0.0, 11)  # local first: ties go to the site's own model


def _blend_weight(local: PatternModels, tz: np.ndarray, tx: np.ndarray, ty: np.ndarray,
                  target_z: tuple[float, float], others: ModelBank, target: int,
                  feats: tuple[int, ...], cfg: BankConfig, n_validation: int) -> float:
    """Weight of the local estimate in hybrid mode, chosen on the site's own rows.

    ``tz``: the site's training features as the local model sees them (z-scored), ``tx``:
    the same rows in the bank's scaled coordinates, ``ty``: their targets (scaled
    coordinates); local predictions are mapped back with ``target_z`` = (mean, sd).
    ``others``: the bank without the site's own cells.
    """
    if others.n_cells == 0 or len(ty) < 2:
        return 1.0
    rng = np.random.default_rng(0)
    v = rng.permutation(len(ty))[:n_validation]
    pl = local.impute(tz[v], exclude=v).values * target_z[1] + target_z[0]
    pf = CellPatternModels(others, target, feats, cfg).impute(tx[v]).values
    err = np.stack([(lam * pl + (1 - lam) * pf - ty[v]) ** 2 for lam in _BLEND_GRID])
    return float(_BLEND_GRID[int(np.argmin(err.mean(axis=1)))])


class FederatedIIM:
    """Private federated IIM over several sites' tables, run in-process.

    Parameters
    ----------
    k : imputation neighbours (anchors and local rows).
    epsilon, delta : each site's privacy budget for this fit ((epsilon, delta)-DP through
        rho-zCDP). ``epsilon=np.inf`` releases exact statistics (same cells and bank).
    bounds : (m, 2) public bounds per attribute (domain knowledge, not data). Required unless
        epsilon is inf (then read from the data, which is not private).
    mode : "hybrid" (default), "federated", "local" or "mean".
    min_records : no cell in the bank describes fewer records (by its noisy count).
    seed : seeds a numpy noise source for reproducible *simulations*; ``None`` (default)
        draws noise with OpenDP's exact sampler, as a deployment must.

    After ``fit``: ``bank_`` (the federation's :class:`ModelBank`), ``ledgers_`` (one
    :class:`PrivacyLedger` per site), ``plan_`` (the :class:`PrivacyPlan`).
    """

    def __init__(
        self,
        k: int = 10,
        epsilon: float = 1.0,
        delta: float = 1e-6,
        bounds: np.ndarray | None = None,
        mode: Mode = "hybrid",
        min_records: int = 10,
        max_depth: int = 16,
        count_fraction: float = 0.1,
        cell_noise_ratio: float = 4.0,
        seed: int | None = None,
    ) -> None:
        if mode not in ("hybrid", "federated", "local", "mean"):
            raise ValueError(f"mode must be hybrid, federated, local or mean; got {mode!r}")
        self.k, self.epsilon, self.delta, self.bounds, self.mode = k, epsilon, delta, bounds, mode
        self.min_records, self.max_depth = min_records, max_depth
        self.count_fraction, self.cell_noise_ratio, self.seed = (
            count_fraction, cell_noise_ratio, seed)

    def _bounds(self, sites: Sequence[np.ndarray]) -> np.ndarray:
        if self.bounds is not None:
            b = np.asarray(self.bounds, dtype=np.float64)
            if b.shape != (sites[0].shape[1], 2) or np.any(b[:, 0] >= b[:, 1]):
                raise ValueError(f"bounds must be an (m, 2) array with lo < hi for m = "
                                 f"{sites[0].shape[1]}, got shape {b.shape}")
            return b
        if np.isfinite(self.epsilon):
            raise ValueError("bounds are required for a private fit (epsilon < inf): they "
                             "must come from domain knowledge, not from the data")
        allx = np.vstack(sites)
        lo, hi = np.nanmin(allx, axis=0), np.nanmax(allx, axis=0)
        return np.column_stack([lo, np.where(hi > lo, hi, lo + 1.0)])

    def fit(self, sites: Sequence[np.ndarray], site_ids: Sequence[str] | None = None,
            ledgers: Sequence[PrivacyLedger | None] | None = None) -> FederatedIIM:
        """Release every site's cells (charged to its ledger) and assemble the bank."""
        sites = [np.asarray(s, dtype=np.float64) for s in sites]
        if not sites or len({s.shape[1] for s in sites}) != 1:
            raise ValueError("sites must be a non-empty list of arrays with the same columns")
        m = sites[0].shape[1]
        self.bounds_ = self._bounds(sites)
        self.site_ids_ = list(site_ids) if site_ids else [f"site{i}" for i in range(len(sites))]
        self.plan_ = plan_privacy(self.epsilon, self.delta, m, min_records=self.min_records,
                                  count_fraction=self.count_fraction, max_depth=self.max_depth,
                                  cell_noise_ratio=self.cell_noise_ratio)
        if ledgers is None:
            # epsilon = inf releases exact statistics: there is no budget to keep.
            ledgers = [PrivacyLedger.in_memory(self.plan_.rho_total, sid)
                       if np.isfinite(self.plan_.rho_total) else None
                       for sid in self.site_ids_]
        self.ledgers_ = list(ledgers)
        seeds = np.random.SeedSequence(self.seed).spawn(len(sites)) if self.seed is not None \
            else [None] * len(sites)
        releases = []
        for x, sid, led, ss in zip(sites, self.site_ids_, self.ledgers_, seeds, strict=True):
            noise = SeededGaussianNoise(ss) if ss is not None else None
            releases.append(site_release(x, self.bounds_, self.plan_, site_id=sid, ledger=led,
                                         noise=noise))
        self.bank_ = assemble_bank(releases, meta={"epsilon": self.epsilon, "delta": self.delta})
        return self

    def transform(self, sites: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Impute every site's table from the bank (no further privacy cost)."""
        return [r.values for r in self.impute(sites)]

    def impute(self, sites: Sequence[np.ndarray]) -> list[ImputationResult]:
        """Like :meth:`transform`, with per-cell provenance and uncertainty."""
        return [site_impute(np.asarray(x, dtype=np.float64), self.bank_, self.bounds_,
                            mode=self.mode, n_neighbors=self.k, site_id=sid)
                for x, sid in zip(sites, self.site_ids_, strict=True)]

    def fit_transform(self, sites: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Fit on the sites and impute them."""
        return self.fit(sites).transform(sites)



