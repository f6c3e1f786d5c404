"""Site-side imputation from the federation's bank, locally: queries never leave the site.

``site_impute`` imputes the site's own incomplete rows in one of four modes: ``local``
(the site's exact IIM), ``federated`` (the bank's cell models), ``hybrid`` (a validated
blend of both and the site's mean) and ``mean``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np

from fediim.federated.bank import NOISE_ALPHA_GRID, BankConfig, BankError, ModelBank
from fediim.federated.engines import BankModels, pattern_models
from fediim.federated.plan import (
    Mode,
    scale_to_bounds,
    unscale,
)
from fediim.impute.estimator import METHOD_IIM, METHOD_MEAN, IIMImputer, ImputationResult
from fediim.impute.iim import IIMConfig, PatternModels


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
