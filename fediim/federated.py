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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from fediim.bank import (
    NOISE_ALPHA_GRID,
    BankConfig,
    BankError,
    BankModels,
    ModelBank,
    pattern_models,
)
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
    rho_gram : spent on the leaf Gram matrices, over all trees (one release per tree).
    partition : one tree's public parameters (per-depth count budget, threshold, depth cap).
    sigma_gram : Gaussian noise std of each Gram entry, in the leaf's own coordinates.
    n_trees : how many differently cut partitions of the same records are released; each
        tree gets ``1 / n_trees`` of the budget (a record is in one leaf per tree).
    """

    rho_total: float
    rho_gram: float
    partition: PartitionPlan
    sigma_gram: float
    min_records: int
    n_trees: int = 1


#: Trees released when statistics are exact (epsilon = inf): they cost nothing, and the
#: mixture over 4 differently cut partitions is ~4% more accurate than one on ccpp
#: (benchmarks/README.md).
EXACT_TREES = 4
#: Depth cap when statistics are exact: deeper trees leave smaller cells (ccpp: median 15
#: records per leaf at depth 40 vs 25 at 16); with noise every depth costs count budget.
EXACT_MAX_DEPTH = 40


def plan_privacy(
    epsilon: float,
    delta: float,
    n_features: int,
    *,
    min_records: int = 10,
    count_fraction: float = 0.1,
    max_depth: int | None = None,
    cell_noise_ratio: float = 4.0,
    n_trees: int | None = None,
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
    if min_records < 1:
        raise ValueError(f"min_records must be >= 1, got {min_records}")
    if n_trees is not None and n_trees < 1:
        raise ValueError(f"n_trees must be >= 1, got {n_trees}")
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
    rho_gram = rho - rho_counts
    sigma = gaussian_sigma(gram_sensitivity(n_features), rho_gram / trees)
    threshold = 2.0 * max(min_records, cell_noise_ratio * sigma)
    part = PartitionPlan(depth, rho_counts / (trees * (depth + 1)), threshold, min_records)
    return PrivacyPlan(rho, rho_gram, part, sigma, min_records, trees)


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
    parts = [_release_tree(xs, plan, t, site_id=site_id, ledger=ledger, noise=noise)
             for t in range(plan.n_trees)]
    return ModelBank.concat(parts) if len(parts) > 1 else parts[0]


def _release_tree(xs: np.ndarray, plan: PrivacyPlan, tree: int, *, site_id: str,
                  ledger: PrivacyLedger | None, noise: NoiseSource | None) -> ModelBank:
    """One tree of :func:`site_release`: its partition and its leaves' noised Grams."""
    m = xs.shape[1]
    leaves = build_partition(xs, plan.partition, ledger=ledger, noise=noise, tree=tree)
    los = np.array([lf.lo for lf in leaves]).reshape(-1, m)
    his = np.array([lf.hi for lf in leaves]).reshape(-1, m)
    centers, widths = 0.5 * (los + his), his - los
    grams = np.stack([
        augmented_gram((xs[lf.rows] - lf.center) / lf.width) for lf in leaves
    ]) if leaves else np.zeros((0, m + 1, m + 1))
    if np.isfinite(plan.rho_gram):
        if ledger is None:
            raise ValueError("a private release needs a ledger to charge")
        vec = upper_triangle(grams).ravel()
        tree_note = f", tree {tree + 1} of {plan.n_trees}" if plan.n_trees > 1 else ""
        noised = release_gaussian(
            vec, sensitivity_l2=gram_sensitivity(m), rho=plan.rho_gram / plan.n_trees,
            ledger=ledger, noise=noise,
            purpose=f"leaf Gram matrices ({len(leaves)} cells, {m} attributes{tree_note})",
        )
        grams = project_psd(from_upper_triangle(noised.reshape(len(leaves), -1), m + 1))
    # Back to the federation's coordinates: z_glob = A^-1 z_cell.
    inv = affine_map(-centers / widths, 1.0 / widths)
    grams = transform_gram(grams, inv)
    keep = grams[:, 0, 0] >= plan.min_records
    n = int(keep.sum())
    prefix = f"{site_id}:" if tree == 0 else f"{site_id}:t{tree}:"
    return ModelBank(
        n_features=m,
        site=np.full(n, site_id, dtype=object).astype(str),
        cell=np.array([f"{prefix}{i}" for i in range(n)], dtype=str),
        lo=los[keep], hi=his[keep],
        gram=grams[keep], sigma=np.full(n, plan.sigma_gram), min_records=plan.min_records,
        tree=np.full(n, tree, dtype=np.int64),
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
    federation-wide mean read off the bank; ``hybrid``: per pattern and target, a blend
    ``w_l * local + w_f * (federated + b) + w_m * site mean`` of the site's own IIM, the
    *other* sites' cells recentred by the site's mean residual ``b`` (shared slopes, the
    site's own level: hospitals differ in case mix), and the site's own mean. The weights
    (a 0.1 grid on the simplex, local first so ties keep the site's own model) are chosen
    on the site's own complete rows (up to ``n_validation``), each predicted without
    itself (the local side by 5-fold cross-fitting). Everything the site validates on
    stays at the site.

    With an exact bank (epsilon = inf) and ``BankConfig.engine == "auto"``, the bank engine
    (IIM over cells or the cell mixture) is chosen the same way, on the site's rows against
    the other sites' cells; a noised bank uses IIM over cells, and with ``noise_alpha=None``
    its noise penalty is chosen so too (heart, Switzerland at epsilon = 4: the other sites'
    cells predict with MSE 0.711 at multiplier 3 vs 0.750 at 0.03). In ``federated`` mode a
    noised bank's estimate is shrunk towards the federation's mean by a weight the site's
    rows choose jointly with the noise penalty, on the whole bank with each row taken out
    of its own cell (see :func:`_shrink_choice`). Every estimate is clipped into the
    public bounds.
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
    with warnings.catch_warnings():  # a column the site never observes: NaN, handled below
        warnings.simplefilter("ignore", RuntimeWarning)
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
    # Validation is against the *other* sites' cells, so the site's own records do not
    # flatter the federated side.
    others = bank.select(bank.site != site_id) if site_id is not None else bank
    choices = _bank_choices(cfg, exact=bool(np.all(bank.sigma == 0)))
    choose = len(choices) > 1 and others.n_cells > 0
    # Federated mode on a noised bank validates on the whole bank instead (_shrink_choice).
    shrink = (mode != "hybrid" and site_id is not None and bank.n_trees == 1
              and bool(np.any(bank.sigma > 0)))
    for p, pat in enumerate(pats):
        r = rows[inverse.ravel() == p]
        feats = tuple(int(c) for c in np.flatnonzero(~pat))
        fz = list(feats)
        for a in (int(c) for c in np.flatnonzero(pat)):
            if mode == "mean" or not feats:
                out[r, a] = unscale(fed_mean[a], bounds, a)
                unc[r, a] = 0.0
                method[r, a] = METHOD_MEAN
                continue
            train = np.flatnonzero((~miss[:, fz]).all(axis=1) & ~miss[:, a])
            v = np.random.default_rng(0).permutation(train)[:n_validation]
            val_q = xs[np.ix_(v, fz)]
            acfg, other_models = cfg, None
            if choose and not shrink and len(v) >= _MIN_VALIDATION:
                acfg, other_models = _best_bank_models(others, a, feats, choices, val_q,
                                                       xs[v, a])
            q = xs[np.ix_(r, fz)]
            if mode == "hybrid" and len(train) > 1:
                if other_models is None and others.n_cells > 0:
                    other_models = pattern_models(others, a, feats, acfg)
                local = PatternModels(zs[np.ix_(train, fz)], zs[train, a], local_cfg)
                loc = local.impute(zs[np.ix_(r, fz)])
                loc_val = loc.values * sd[a] + mu[a]
                pos = np.searchsorted(train, v)  # v's positions among the training rows
                pl = _local_crossfit(zs[np.ix_(train, fz)], zs[train, a], pos,
                                     local_cfg) * sd[a] + mu[a]
                w, bias = _hybrid_weights(pl, other_models, val_q, xs[v, a], xs[train, a])
                site_mean = float(xs[train, a].mean())
                parts = [(w[0], loc_val, loc.spread * sd[a])]
                fed = None
                if w[1] > 0 and other_models is not None:
                    fed = other_models.impute(q)
                    parts.append((w[1], fed.values + bias, fed.spread))
                parts.append((w[2], np.full(len(r), site_mean), np.zeros(len(r))))
                val = sum(wi * vi for wi, vi, _ in parts)
                # Spread of the blend: within-part spreads plus disagreement between parts.
                spread = np.sqrt(sum(wi * (si**2 + (vi - val) ** 2) for wi, vi, si in parts))
                ells = w[0] * loc.ell.mean(axis=1)
                n_c = loc.ell.shape[1]
                if fed is not None:
                    ells = ells + w[1] * fed.ell.mean(axis=1)
                    n_c += fed.ell.shape[1]
            else:
                w = 1.0
                if shrink:
                    # Noised cell models can be worse than the federation's mean (diabetes,
                    # epsilon = 1: NRMSE 1.75 vs 0.97): shrink towards it by the weight the
                    # site's rows choose, jointly with the noise penalty, on the whole bank
                    # with each row out of its own cell (bank-only information, chosen
                    # locally).
                    acfg, w = _shrink_choice(bank, site_id, a, feats, choices, xs[train],
                                             fed_mean[a])
                fed = pattern_models(bank, a, feats, acfg).impute(q)
                val = w * fed.values + (1 - w) * fed_mean[a]
                spread = w * fed.spread
                ells, n_c = fed.ell.mean(axis=1), fed.ell.shape[1]
            # An imputation outside the public domain bounds is never right: clip into them.
            out[r, a] = unscale(np.clip(val, -0.5, 0.5), bounds, a)
            unc[r, a] = spread * (bounds[a, 1] - bounds[a, 0])
            method[r, a] = METHOD_IIM
            ell[r, a] = ells
            ncand[r, a] = n_c
    return ImputationResult(out, miss, unc, method, ell, ncand)


_MIN_VALIDATION = 20  # fewer validation rows: keep the default engine
_STEP = 0.1
# Blend weights (local, recentred federated, site mean) on a 0.1 simplex grid, local-only
# first so that ties keep the site's own model.
_HYBRID_GRID = np.array(sorted(
    ((i * _STEP, j * _STEP, round(1 - (i + j) * _STEP, 10))
     for i in range(11) for j in range(11 - i)),
    key=lambda w: (-w[0], -w[1])))


_FOLDS = 5


def _local_crossfit(tf: np.ndarray, ty: np.ndarray, pos: np.ndarray,
                    cfg: IIMConfig) -> np.ndarray:
    """Local IIM predictions of training rows ``pos``, each from models fitted without it.

    K-fold cross-fitting: ``exclude`` in :meth:`PatternModels.impute` only keeps a row from
    being its own neighbour, while its neighbours' models were learned *with* it, which
    flatters the local side (on a 12-row site its error looked 300x smaller than it is).
    """
    pred = np.empty(len(pos))
    folds = np.arange(len(pos)) % _FOLDS
    for k in range(min(_FOLDS, len(pos))):
        held = folds == k
        keep = np.ones(len(ty), dtype=bool)
        keep[pos[held]] = False
        if not keep.any():
            pred[held] = 0.0  # the z-scored site mean
            continue
        model = PatternModels(tf[keep], ty[keep], cfg)
        pred[held] = model.impute(tf[pos[held]]).values
    return pred


_SHRINK_GRID = np.linspace(1.0, 0.0, 11)  # bank first: ties keep the bank's models


def _shrink_choice(bank: ModelBank, site_id: str, target: int, feats: tuple[int, ...],
                   choices: list[BankConfig], rows: np.ndarray, mean: float
                   ) -> tuple[BankConfig, float]:
    """Bank configuration and weight of its models against the federation's mean, chosen
    jointly on the site's rows.

    ``rows``: the site's rows observed on F and the target (scaled coordinates, NaN where
    missing). Each is predicted by a bank from which the row itself was taken out: a row
    complete on every attribute was released, and the site knows which of its cells holds
    it, so it subtracts the row's ``z zᵀ`` from that cell's noised Gram (5 folds of rows at
    a time); other rows were never in the bank. Validating against the bank as released
    flatters it (most at a small site whose one or two cells are nearly all its rows);
    leaving the site's cells out altogether misjudges a site unlike the others (red vs
    white wine: a noise penalty chosen against white's cells alone made red's federated
    imputation worse at every epsilon >= 2). Both sides are bank information; ties go to
    the first configuration and to the bank's models.
    """
    own = np.flatnonzero(bank.site == site_id)
    if own.size == 0 or len(rows) < _MIN_VALIDATION:
        return choices[0], 1.0
    m = bank.n_features
    tx, ty = rows[:, list(feats)], rows[:, target]
    released = np.flatnonzero(~np.isnan(rows).any(axis=1))
    full = rows[released]
    inside = np.ones((len(released), own.size), dtype=bool)
    for j in range(m):  # a released row lies in (at most) one of its site's cells
        inside &= (full[:, [j]] >= bank.lo[own, j]) & (
            (full[:, [j]] < bank.hi[own, j]) | (bank.hi[own, j] >= 0.5))
    cell = np.full(len(rows), -1)
    cell[released] = np.where(inside.any(axis=1), own[inside.argmax(axis=1)], -1)
    z = np.column_stack([np.ones(len(rows)), np.nan_to_num(rows)])
    pf = np.empty((len(choices), len(rows)))
    folds = np.random.default_rng(0).permutation(len(rows)) % _FOLDS
    for k in range(_FOLDS):
        held = np.flatnonzero(folds == k)
        gram = bank.gram.copy()
        sel = held[cell[held] >= 0]
        np.subtract.at(gram, cell[sel], z[sel, :, None] * z[sel, None, :])
        # A noised count can fall below zero once rows are out: such a cell is noise only.
        gram[:, 0, 0] = np.maximum(gram[:, 0, 0], 1e-9)
        loo = ModelBank(n_features=m, site=bank.site, cell=bank.cell, lo=bank.lo, hi=bank.hi,
                        gram=gram, sigma=bank.sigma, min_records=0, tree=bank.tree)
        for c, cfg in enumerate(choices):
            pf[c, held] = pattern_models(loo, target, feats, cfg).impute(tx[held]).values
    w = _SHRINK_GRID[None, :, None]
    err = ((w * pf[:, None, :] + (1 - w) * mean - ty) ** 2).mean(axis=2)  # (choice, weight)
    c, i = np.unravel_index(int(np.argmin(err)), err.shape)
    return choices[int(c)], float(_SHRINK_GRID[i])


def _bank_choices(cfg: BankConfig, exact: bool) -> list[BankConfig]:
    """The bank configurations a site chooses between on its own rows (ties: the first).

    An exact bank with ``engine="auto"``: IIM over cells or the cell mixture. A noised bank
    (IIM over cells) with ``noise_alpha=None``: each multiplier of :data:`NOISE_ALPHA_GRID`.
    """
    if exact and cfg.engine == "auto":
        return [replace(cfg, engine=e) for e in ("cells", "mixture")]
    if not exact and cfg.engine in ("auto", "cells") and cfg.noise_alpha is None:
        return [replace(cfg, engine="cells", noise_alpha=na) for na in NOISE_ALPHA_GRID]
    return [cfg]


def _best_bank_models(others: ModelBank, target: int, feats: tuple[int, ...],
                      choices: list[BankConfig], val_q: np.ndarray, val_y: np.ndarray
                      ) -> tuple[BankConfig, BankModels]:
    """The configuration with the lowest error on the site's validation rows, and its
    models over ``others`` (fitted once, reused by the hybrid blend). Ties: the first."""
    best: tuple[float, BankConfig, BankModels] | None = None
    for c in choices:
        models = pattern_models(others, target, feats, c)
        err = float(np.mean((models.impute(val_q).values - val_y) ** 2))
        if best is None or err < best[0]:
            best = (err, c, models)
    assert best is not None
    return best[1], best[2]


def _hybrid_weights(pl: np.ndarray, others: BankModels | None, val_q: np.ndarray,
                    val_y: np.ndarray, train_y: np.ndarray) -> tuple[np.ndarray, float]:
    """Hybrid blend weights and the federated side's recentring, from the site's own rows.

    ``pl``: cross-fitted local predictions of the validation rows (``val_q``, ``val_y``);
    ``others``: the bank models over the other sites' cells (None if there are none);
    ``train_y``: the target on all the site's training rows. Every validation prediction
    leaves its own row out: the local one by cross-fitting, the recentring and the site
    mean as leave-one-out means.
    """
    nv = len(val_y)
    if others is None or nv < 2:
        return np.array([1.0, 0.0, 0.0]), 0.0
    pf = others.impute(val_q).values
    res = val_y - pf
    bias = float(res.mean())
    bias_loo = (res.sum() - res) / (nv - 1)
    nt = len(train_y)
    mean_loo = (train_y.sum() - val_y) / max(nt - 1, 1)
    preds = np.stack([pl, pf + bias_loo, mean_loo])  # (3, nv)
    err = ((_HYBRID_GRID @ preds - val_y) ** 2).mean(axis=1)
    return _HYBRID_GRID[int(np.argmin(err))], bias


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
    max_depth, n_trees : the partition's depth cap and number of differently cut trees;
        ``None`` picks by budget (see :func:`plan_privacy`).
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
        max_depth: int | None = None,
        count_fraction: float = 0.1,
        cell_noise_ratio: float = 4.0,
        seed: int | None = None,
        n_trees: int | None = None,
    ) -> None:
        if mode not in ("hybrid", "federated", "local", "mean"):
            raise ValueError(f"mode must be hybrid, federated, local or mean; got {mode!r}")
        self.k, self.epsilon, self.delta, self.bounds, self.mode = k, epsilon, delta, bounds, mode
        self.min_records, self.max_depth = min_records, max_depth
        self.count_fraction, self.cell_noise_ratio, self.seed = (
            count_fraction, cell_noise_ratio, seed)
        self.n_trees = n_trees

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
                                  cell_noise_ratio=self.cell_noise_ratio,
                                  n_trees=self.n_trees)
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



