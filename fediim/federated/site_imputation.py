"""Site-side imputation from the federation's bank, locally: queries never leave the site.

:func:`site_impute` imputes a site's own incomplete rows in one of the four modes of
:data:`~fediim.federated.plan.MODES`. ``local`` is the site's own
:class:`~fediim.impute.IIMImputer` over its whole table. The other modes split the rows
into :class:`ImputationJob` s, one per (missingness pattern, target attribute), and give
each job to its mode's function: :func:`impute_mean`, :func:`impute_federated` or
:func:`impute_hybrid`. Everything a site validates on stays at the site.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from fediim.federated.bank import NOISE_ALPHA_GRID, BankConfig, BankError, ModelBank
from fediim.federated.engines import BankModels, pattern_models
from fediim.federated.plan import MODES, Mode, scale_to_bounds, unscale
from fediim.impute.estimator import IIMImputer, empty_result, missing_patterns
from fediim.impute.iim import IIMConfig, PatternModels
from fediim.io.result import METHOD_FALLBACK, METHOD_IIM, METHOD_MEAN, ImputationResult

__all__ = ["BLEND_WEIGHTS", "ImputationJob", "JobEstimate", "SiteView", "impute_federated",
           "impute_hybrid", "impute_local", "impute_mean", "local_fallback", "site_impute"]

log = logging.getLogger(__name__)

#: Fewer validation rows than this: a site keeps the default bank configuration.
MIN_VALIDATION_ROWS = 20
#: Folds of the cross-fitting that keeps validated rows out of the models that predict them.
CROSSFIT_FOLDS = 5
_WEIGHT_STEP = 0.1
#: Hybrid blend weights (local, recentred federated, site mean) on a 0.1 grid of the
#: simplex, local-only first so that ties keep the site's own model.
BLEND_WEIGHTS = np.array(sorted(
    ((i * _WEIGHT_STEP, j * _WEIGHT_STEP, round(1 - (i + j) * _WEIGHT_STEP, 10))
     for i in range(11) for j in range(11 - i)),
    key=lambda weights: (-weights[0], -weights[1])))
#: Weights of the bank's estimate against the federation's mean (federated mode on a noised
#: bank); the bank first, so that ties keep the bank's models.
SHRINK_WEIGHTS = np.linspace(1.0, 0.0, 11)


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
    random_state: int | None = 0,
    use_federation_in_blend: bool = True,
) -> ImputationResult:
    """Impute a site's incomplete rows locally (queries never leave the site).

    Parameters
    ----------
    x : ndarray of shape (n, m)
        The site's table, NaN where missing.
    bank : ModelBank or None
        The federation's bank (not needed in ``local`` mode).
    bounds : ndarray of shape (m, 2)
        Public bounds per attribute; every estimate is clipped into them.
    mode : {"hybrid", "federated", "local", "mean"}, default="hybrid"
        ``local``: the site's own IIM only; ``mean``: the federation-wide mean read off the
        bank; ``federated``: the bank's cell models (see :func:`impute_federated`);
        ``hybrid``: a blend of local, federated and the site's mean whose weights the
        site's own rows choose (see :func:`impute_hybrid`).
    n_neighbors : int, default=10
        Imputation neighbours, locally and in the bank (unless ``bank_config`` says).
    bank_config : BankConfig, optional
        How to read the bank; default ``BankConfig(n_neighbors=n_neighbors)``. A choice it
        leaves open (``engine="auto"`` on an exact bank, ``noise_alpha=None`` on a noised
        one) the site makes per job on its own rows (see :func:`bank_choices`).
    site_id : str, optional
        The site's id in the bank. With it, the site validates against the *other*
        sites' cells, so that its own records do not flatter the federated side.
    n_validation : int, default=400
        At most this many of the site's complete rows validate each job's choices.
    random_state : int or None, default=0
        Seeds which rows validate and how they are split into folds. Every job draws from
        its own generator seeded with it, so a job's draws do not depend on the jobs
        before it. ``None``: fresh entropy.
    use_federation_in_blend : bool, default=True
        ``False`` restricts the hybrid blend to local and site mean (federated weight 0):
        the ablation that measures what the other sites add.

    Returns
    -------
    ImputationResult
        The completed table with per-cell provenance and uncertainty.
    """
    x = np.asarray(x, dtype=np.float64)
    _check_arguments(mode, random_state)
    if mode == "local":
        return impute_local(x, n_neighbors)
    bank = _usable_bank(bank, mode)
    fallback = _LocalFallback(x, n_neighbors)
    try:
        site = SiteView.build(
            x, bank, bounds, mode=mode, n_neighbors=n_neighbors, site_id=site_id,
            config=bank_config or BankConfig(n_neighbors=n_neighbors),
            random_state=random_state, blend_weights=BLEND_WEIGHTS if use_federation_in_blend
            else BLEND_WEIGHTS[BLEND_WEIGHTS[:, 1] == 0])
    except NUMERICAL_FAILURES as exc:
        return fallback.everything(exc)
    result = empty_result(x)
    for job in imputation_jobs(site.missing, n_validation, random_state):
        try:
            _impute_job(site, job, result, mode)
        except NUMERICAL_FAILURES as exc:
            fallback.fill(result, job, exc)
    return result


#: What a degenerate or crafted bank can provoke in the numerics. The job's cells then
#: come from the site's own IIM, so a bank can never turn the outcome into a signal.
NUMERICAL_FAILURES = (ArithmeticError, ValueError, np.linalg.LinAlgError)


def _impute_job(site: SiteView, job: ImputationJob, result: ImputationResult,
                mode: Mode) -> None:
    """One job in ``mode``; a non-finite estimate is a numerical failure."""
    if mode == "mean" or not job.features:
        impute_mean(site, job, result)
        estimate = result.values[job.rows, job.target]
    else:
        if mode == "hybrid" and len(job.train) > 1:
            found = impute_hybrid(site, job)
        else:
            found = impute_federated(site, job)
        estimate = found.values
        if np.all(np.isfinite(found.values)) and np.all(np.isfinite(found.spread)):
            _record(result, site, job, found)
    if not np.all(np.isfinite(estimate)):
        raise FloatingPointError("the bank's models gave a non-finite estimate")


class _LocalFallback:
    """The site's own IIM over its whole table, computed once, on the first failure."""

    def __init__(self, x: np.ndarray, n_neighbors: int) -> None:
        self._x, self._n_neighbors = x, n_neighbors
        self._local: ImputationResult | None = None

    def _result(self) -> ImputationResult:
        if self._local is None:
            self._local = impute_local(self._x, self._n_neighbors)
        return self._local

    def fill(self, result: ImputationResult, job: ImputationJob, exc: Exception) -> None:
        """Fill ``job``'s cells from the local result, marked ``fallback``."""
        log.warning("imputation from the bank failed for one job (%s); the site's own IIM "
                    "fills its cells", type(exc).__name__)
        local, rows, target = self._result(), job.rows, job.target
        for name in ("values", "uncertainty", "ell", "n_candidates"):
            getattr(result, name)[rows, target] = getattr(local, name)[rows, target]
        result.method[rows, target] = METHOD_FALLBACK

    def everything(self, exc: Exception) -> ImputationResult:
        """The whole local result, every imputed cell marked ``fallback``."""
        log.warning("the bank could not be read (%s); the site's own IIM fills every cell",
                    type(exc).__name__)
        return local_fallback(self._x, self._n_neighbors)


def local_fallback(x: np.ndarray, n_neighbors: int) -> ImputationResult:
    """The site's own IIM for every cell, each marked ``fallback``: what a site uses when
    the federation's bank cannot be used at all."""
    local = impute_local(x, n_neighbors)
    local.method[local.imputed] = METHOD_FALLBACK
    return local


def impute_local(x: np.ndarray, n_neighbors: int) -> ImputationResult:
    """The site's own exact IIM over its whole table (``local`` mode): no bank at all."""
    return IIMImputer(n_neighbors=n_neighbors).fit(x).impute(x)


def _check_arguments(mode: str, random_state: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if random_state is not None and not (
            isinstance(random_state, int | np.integer) and not isinstance(random_state, bool)
            and random_state >= 0):
        raise ValueError(f"random_state must be a non-negative int or None, got "
                         f"{random_state!r}")


def _usable_bank(bank: ModelBank | None, mode: str) -> ModelBank:
    """The bank, or a clear error when a bank-reading mode has none to read."""
    if bank is None:
        raise ValueError(f"mode {mode!r} needs a model bank")
    if bank.n_cells == 0:
        raise BankError(f"mode {mode!r}: the model bank holds no cells (every site had "
                        f"fewer than {bank.min_records} complete records per cell); use "
                        "mode='local' or gather more sites")
    return bank


@dataclass(frozen=True)
class ImputationJob:
    """One imputation job: the site's rows of one missingness pattern, for one target.

    rows : the site's rows with this pattern (every one misses ``target``).
    target : the attribute imputed.
    features : the attributes these rows observe (F); empty when they observe none.
    train : the site's rows observed on F and on the target: its own evidence.
    validation : up to ``n_validation`` of ``train`` in random order, on which the site
        chooses its bank configuration, blend or shrinkage for this job.
    """

    rows: np.ndarray
    target: int
    features: tuple[int, ...]
    train: np.ndarray
    validation: np.ndarray


def imputation_jobs(missing: np.ndarray, n_validation: int, random_state: int | None
                    ) -> Iterator[ImputationJob]:
    """The jobs of a site whose missing cells are ``missing``: per pattern, per target."""
    for rows, features, targets in missing_patterns(missing):
        observed_features = (~missing[:, list(features)]).all(axis=1)
        for target in targets:
            train = np.flatnonzero(observed_features & ~missing[:, target])
            validation = np.random.default_rng(random_state).permutation(train)[:n_validation]
            yield ImputationJob(rows, target, features, train, validation)


@dataclass(frozen=True)
class SiteView:
    """What every job of one :func:`site_impute` call reads, worked out once per call.

    scaled : the site's table in the bank's coordinates (public bounds to [-1/2, 1/2]).
    standardized, center, scale : ``standardized = (scaled - center) / scale`` with the
        site's own mean and spread: the local side works there, exactly as local mode does
        (the site's data never leave, so nothing here is private).
    missing : where the site's table is NaN.
    bounds : the public bounds per attribute.
    bank, others : the whole bank, and the other sites' cells (the whole bank when the
        site has no id) that the site validates against.
    config, choices : the bank configuration asked for, and those the site chooses
        between on its own rows (see :func:`bank_choices`).
    choose_config : whether there is a choice, and cells to make it on.
    shrink : federated mode on a noised single-tree bank with a known site: shrink towards
        the federation's mean (see :func:`choose_shrinkage`) instead.
    federation_mean : the federation-wide mean per attribute, read off the bank.
    local_config : the local side's IIM configuration.
    blend_weights : the hybrid blend's candidate weights.
    site_id : the site's id in the bank, if known.
    random_state : seeds each job's random choices (see :func:`site_impute`).
    """

    scaled: np.ndarray
    standardized: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    missing: np.ndarray
    bounds: np.ndarray
    bank: ModelBank
    others: ModelBank
    config: BankConfig
    choices: list[BankConfig]
    choose_config: bool
    shrink: bool
    federation_mean: np.ndarray
    local_config: IIMConfig
    blend_weights: np.ndarray
    site_id: str | None
    random_state: int | None

    @classmethod
    def build(cls, x: np.ndarray, bank: ModelBank, bounds: np.ndarray, *, mode: Mode,
              n_neighbors: int, site_id: str | None, config: BankConfig,
              blend_weights: np.ndarray, random_state: int | None) -> SiteView:
        scaled, _ = scale_to_bounds(x, bounds)
        # A column the site never observes gets NaN statistics: neutral ones instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            spread = np.nanstd(scaled, axis=0)
            mean = np.nanmean(scaled, axis=0)
        spread = np.where(np.isfinite(spread) & (spread > 0), spread, 1.0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        others = bank.select(bank.site != site_id) if site_id is not None else bank
        choices = bank_choices(config, exact=bool(np.all(bank.sigma == 0)))
        return cls(
            scaled=scaled, standardized=(scaled - mean) / spread, center=mean, scale=spread,
            missing=np.isnan(x), bounds=bounds, bank=bank, others=others, config=config,
            choices=choices,
            choose_config=len(choices) > 1 and others.n_cells > 0,
            shrink=(mode != "hybrid" and site_id is not None and bank.n_trees == 1
                    and bool(np.any(bank.sigma > 0))),
            federation_mean=bank.column_moments()[0],
            local_config=IIMConfig(n_neighbors=n_neighbors), blend_weights=blend_weights,
            site_id=site_id, random_state=random_state)

    def queries(self, job: ImputationJob) -> np.ndarray:
        """The job's rows on its features, in the bank's coordinates."""
        return self.scaled[np.ix_(job.rows, list(job.features))]

    def validation_queries(self, job: ImputationJob) -> np.ndarray:
        """The job's validation rows on its features, in the bank's coordinates."""
        return self.scaled[np.ix_(job.validation, list(job.features))]


@dataclass(frozen=True)
class JobEstimate:
    """A job's estimates, in the bank's coordinates, with their provenance.

    values, spread : per row of the job; ``spread`` is the candidates' weighted spread.
    ell : per row, the mean chosen ell over the models that voted.
    n_candidates : how many candidates voted for each row.
    """

    values: np.ndarray
    spread: np.ndarray
    ell: np.ndarray
    n_candidates: int


def _record(result: ImputationResult, site: SiteView, job: ImputationJob,
            estimate: JobEstimate) -> None:
    """Write a job's estimate into ``result``, clipped into the public bounds (an
    imputation outside the public domain is never right)."""
    rows, target, bounds = job.rows, job.target, site.bounds
    result.values[rows, target] = unscale(np.clip(estimate.values, -0.5, 0.5), bounds, target)
    result.uncertainty[rows, target] = estimate.spread * (bounds[target, 1]
                                                          - bounds[target, 0])
    result.method[rows, target] = METHOD_IIM
    result.ell[rows, target] = estimate.ell
    result.n_candidates[rows, target] = estimate.n_candidates


def impute_mean(site: SiteView, job: ImputationJob, result: ImputationResult) -> None:
    """Fill the job's cells with the federation's mean (``mean`` mode, and the fallback for
    rows that observe no attribute)."""
    rows, target = job.rows, job.target
    result.values[rows, target] = unscale(site.federation_mean[target], site.bounds, target)
    result.uncertainty[rows, target] = 0.0
    result.method[rows, target] = METHOD_MEAN


def impute_federated(site: SiteView, job: ImputationJob) -> JobEstimate:
    """The bank's cell models alone (``federated`` mode; ``hybrid`` for a job whose site
    has fewer than two training rows).

    The bank configuration is the one the site's validation rows choose against the other
    sites' cells (:func:`best_bank_models`). On a noised bank with a known site, it is
    chosen instead jointly with a weight that shrinks the estimate towards the
    federation's mean (:func:`choose_shrinkage`): noised cell models can be worse than
    that mean.
    """
    config, _ = _config_and_other_models(site, job)
    weight = 1.0
    mean = shrink_target(site, job)
    if site.shrink:
        assert site.site_id is not None  # site.shrink needs it
        observed = site.scaled[job.train, job.target]
        mean_without_row = (observed.sum() - observed) / max(len(observed) - 1, 1)
        config, weight = choose_shrinkage(
            site.bank, site.site_id, job.target, job.features, site.choices,
            site.scaled[job.train], mean_without_row, site.random_state)
    bank_side = pattern_models(site.bank, job.target, job.features, config).impute(
        site.queries(job))
    return JobEstimate(values=weight * bank_side.values + (1 - weight) * mean,
                       spread=weight * bank_side.spread, ell=bank_side.ell.mean(axis=1),
                       n_candidates=bank_side.ell.shape[1])


def shrink_target(site: SiteView, job: ImputationJob) -> float:
    """What federated mode shrinks the bank's estimate towards: the site's own mean of the
    target where it observes it (exact, and never left the site), else the federation's
    mean read off the bank (a column the site never measures). On a small federation the
    bank's mean is noisy: at eps = 1 each site's noised sums move it by about a standard
    deviation on wide public bounds."""
    observed = site.scaled[job.train, job.target]
    return float(observed.mean()) if observed.size else float(
        site.federation_mean[job.target])


def impute_hybrid(site: SiteView, job: ImputationJob) -> JobEstimate:
    """``w_l * local + w_f * (federated + b) + w_m * site mean``, weights chosen per job.

    ``local`` is the site's own IIM; ``federated`` the *other* sites' cells recentred by
    the site's mean residual ``b`` (shared slopes, the site's own level: hospitals differ
    in case mix); ``site mean`` the site's own mean. The weights come from
    ``site.blend_weights`` and are chosen on the job's validation rows, each predicted
    without itself (see :func:`choose_blend`).
    """
    target, features = job.target, list(job.features)
    _, other_models = _config_and_other_models(site, job)
    if other_models is None and site.others.n_cells > 0:
        other_models = pattern_models(site.others, target, job.features, site.config)
    train_features = site.standardized[np.ix_(job.train, features)]
    train_target = site.standardized[job.train, target]
    scale, center = site.scale[target], site.center[target]
    local = PatternModels(train_features, train_target, site.local_config).impute(
        site.standardized[np.ix_(job.rows, features)])
    positions = np.searchsorted(job.train, job.validation)  # among the training rows
    local_validation = crossfitted_local_predictions(
        train_features, train_target, positions, site.local_config) * scale + center
    weights, bias = choose_blend(
        local_validation, other_models, site.validation_queries(job),
        site.scaled[job.validation, target], site.scaled[job.train, target],
        site.blend_weights)
    parts = [(weights[0], local.values * scale + center, local.spread * scale)]
    ell = weights[0] * local.ell.mean(axis=1)
    n_candidates = local.ell.shape[1]
    if weights[1] > 0 and other_models is not None:
        federated = other_models.impute(site.queries(job))
        parts.append((weights[1], federated.values + bias, federated.spread))
        ell = ell + weights[1] * federated.ell.mean(axis=1)
        n_candidates += federated.ell.shape[1]
    site_mean = float(site.scaled[job.train, target].mean())
    parts.append((weights[2], np.full(len(job.rows), site_mean), np.zeros(len(job.rows))))
    values = sum(weight * part for weight, part, _ in parts)
    # Spread of the blend: within-part spreads plus disagreement between parts.
    spread = np.sqrt(sum(weight * (part_spread**2 + (part - values) ** 2)
                         for weight, part, part_spread in parts))
    return JobEstimate(values=values, spread=spread, ell=ell, n_candidates=n_candidates)


def _config_and_other_models(site: SiteView, job: ImputationJob
                             ) -> tuple[BankConfig, BankModels | None]:
    """The bank configuration for a job, and its models over the other sites' cells when
    choosing it fitted them (None otherwise). The default configuration stands when there
    is nothing to choose, too few validation rows, or the shrinkage chooses instead."""
    if (not site.choose_config or site.shrink
            or len(job.validation) < MIN_VALIDATION_ROWS):
        return site.config, None
    return best_bank_models(site.others, job.target, job.features, site.choices,
                            site.validation_queries(job),
                            site.scaled[job.validation, job.target])


def bank_choices(config: BankConfig, exact: bool) -> list[BankConfig]:
    """The bank configurations a site chooses between on its own rows (ties: the first).

    An exact bank with ``engine="auto"``: IIM over cells or the cell mixture. A noised bank
    (IIM over cells) with ``noise_alpha=None``: each multiplier of :data:`NOISE_ALPHA_GRID`.
    """
    if exact and config.engine == "auto":
        return [replace(config, engine=engine) for engine in ("cells", "mixture")]
    if not exact and config.engine in ("auto", "cells") and config.noise_alpha is None:
        return [replace(config, engine="cells", noise_alpha=multiplier)
                for multiplier in NOISE_ALPHA_GRID]
    return [config]


def best_bank_models(others: ModelBank, target: int, features: tuple[int, ...],
                     choices: list[BankConfig], queries: np.ndarray, truth: np.ndarray
                     ) -> tuple[BankConfig, BankModels]:
    """The configuration with the lowest error on the site's validation rows (``queries``
    on the features, ``truth`` on the target), and its models over ``others`` (fitted
    once, reused by the hybrid blend). Ties: the first."""
    best: tuple[float, BankConfig, BankModels] | None = None
    for config in choices:
        models = pattern_models(others, target, features, config)
        error = float(np.mean((models.impute(queries).values - truth) ** 2))
        if best is None or error < best[0]:
            best = (error, config, models)
    assert best is not None
    return best[1], best[2]


def crossfitted_local_predictions(train_features: np.ndarray, train_target: np.ndarray,
                                  positions: np.ndarray, config: IIMConfig) -> np.ndarray:
    """Local IIM predictions of the training rows at ``positions``, each from models
    fitted without it.

    K-fold cross-fitting: ``exclude`` in :meth:`PatternModels.impute` only keeps a row from
    being its own neighbour, while its neighbours' models were learned *with* it, which
    flatters the local side, most on a small site.
    """
    predictions = np.empty(len(positions))
    folds = np.arange(len(positions)) % CROSSFIT_FOLDS
    for fold in range(min(CROSSFIT_FOLDS, len(positions))):
        held = folds == fold
        keep = np.ones(len(train_target), dtype=bool)
        keep[positions[held]] = False
        if not keep.any():
            predictions[held] = 0.0  # the standardized site mean
            continue
        model = PatternModels(train_features[keep], train_target[keep], config)
        predictions[held] = model.impute(train_features[positions[held]]).values
    return predictions


def choose_blend(local: np.ndarray, others: BankModels | None, queries: np.ndarray,
                 truth: np.ndarray, train_target: np.ndarray, grid: np.ndarray
                 ) -> tuple[np.ndarray, float]:
    """Hybrid blend weights (a row of ``grid``) and the federated side's recentring.

    ``local``: cross-fitted local predictions of the validation rows (``queries`` on the
    features, ``truth`` on the target); ``others``: the bank models over the other sites'
    cells (None if there are none); ``train_target``: the target on all the site's
    training rows. Every validation prediction leaves its own row out: the local one by
    cross-fitting, the recentring and the site mean as leave-one-out means.
    """
    n_validation = len(truth)
    if others is None or n_validation < 2:
        return np.array([1.0, 0.0, 0.0]), 0.0
    federated = others.impute(queries).values
    residuals = truth - federated
    bias = float(residuals.mean())
    bias_without_row = (residuals.sum() - residuals) / (n_validation - 1)
    mean_without_row = (train_target.sum() - truth) / max(len(train_target) - 1, 1)
    predictions = np.stack([local, federated + bias_without_row, mean_without_row])
    errors = ((grid @ predictions - truth) ** 2).mean(axis=1)
    return grid[int(np.argmin(errors))], bias


def choose_shrinkage(bank: ModelBank, site_id: str, target: int, features: tuple[int, ...],
                     choices: list[BankConfig], rows: np.ndarray, mean: float | np.ndarray,
                     random_state: int | None = 0) -> tuple[BankConfig, float]:
    """The bank configuration and the weight of its models against ``mean`` (a scalar, or
    one value per row: the site's mean without that row), chosen jointly on the site's
    ``rows``.

    ``rows``: the site's rows observed on the features and the target (bank coordinates,
    NaN where missing). Each is predicted by a bank from which the row itself was taken
    out (:func:`leave_own_rows_out_predictions`). Validating against the bank as released
    flatters it (most at a small site whose one or two cells are nearly all its rows);
    leaving the site's cells out altogether misjudges a site unlike the others. Both sides
    are bank information; ties go to the first configuration and to the bank's models.
    """
    own = np.flatnonzero(bank.site == site_id)
    if own.size == 0 or len(rows) < MIN_VALIDATION_ROWS:
        return choices[0], 1.0
    predictions = leave_own_rows_out_predictions(bank, own, rows, target, features, choices,
                                                 random_state)
    weights = SHRINK_WEIGHTS[None, :, None]
    errors = ((weights * predictions[:, None, :] + (1 - weights) * mean - rows[:, target])
              ** 2).mean(axis=2)  # (choice, weight)
    choice, weight = np.unravel_index(int(np.argmin(errors)), errors.shape)
    return choices[int(choice)], float(SHRINK_WEIGHTS[weight])


def leave_own_rows_out_predictions(bank: ModelBank, own: np.ndarray, rows: np.ndarray,
                                   target: int, features: tuple[int, ...],
                                   choices: list[BankConfig], random_state: int | None
                                   ) -> np.ndarray:
    """Each configuration's prediction of each of the site's ``rows``, shape
    (len(choices), len(rows)), from the bank minus the row itself.

    A row complete on every attribute was released, and the site knows which of its
    cells (``own``) holds it, so it subtracts the row's ``z zᵀ`` from that cell's noised
    Gram; other rows were never in the bank. Rows go out in :data:`CROSSFIT_FOLDS` random
    folds at a time.
    """
    # As released: clamped to the site's clipping box, zero where it measures nothing.
    rows = np.clip(rows, bank.clip_lo[own[0]], bank.clip_hi[own[0]])
    rows[:, ~bank.observed[own[0]]] = 0.0
    cell = _own_cell_of_rows(bank, own, rows)
    augmented = np.column_stack([np.ones(len(rows)), np.nan_to_num(rows)])
    predictions = np.empty((len(choices), len(rows)))
    folds = np.random.default_rng(random_state).permutation(len(rows)) % CROSSFIT_FOLDS
    for fold in range(CROSSFIT_FOLDS):
        held = np.flatnonzero(folds == fold)
        gram = bank.gram.copy()
        released = held[cell[held] >= 0]
        np.subtract.at(gram, cell[released],
                       augmented[released, :, None] * augmented[released, None, :])
        # A noised count can fall below zero once rows are out: such a cell is noise only.
        gram[:, 0, 0] = np.maximum(gram[:, 0, 0], 1e-9)
        without_fold = ModelBank(
            n_features=bank.n_features, site=bank.site, cell=bank.cell, lo=bank.lo,
            hi=bank.hi, gram=gram, sigma=bank.sigma, min_records=0, tree=bank.tree,
            clip_lo=bank.clip_lo, clip_hi=bank.clip_hi, observed=bank.observed)
        queries = rows[np.ix_(held, list(features))]
        for number, config in enumerate(choices):
            predictions[number, held] = pattern_models(
                without_fold, target, features, config).impute(queries).values
    return predictions


def _own_cell_of_rows(bank: ModelBank, own: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row, the bank index of the site's cell that holds it (-1: not released)."""
    released = np.flatnonzero(~np.isnan(rows).any(axis=1))
    complete = rows[released]
    inside = np.ones((len(released), own.size), dtype=bool)
    for column in range(bank.n_features):  # a released row lies in at most one own cell
        values = complete[:, [column]]
        inside &= (values >= bank.lo[own, column]) & (
            (values < bank.hi[own, column])
            | (bank.hi[own, column] >= bank.clip_hi[own, column]))
    cell = np.full(len(rows), -1)
    cell[released] = np.where(inside.any(axis=1), own[inside.argmax(axis=1)], -1)
    return cell
