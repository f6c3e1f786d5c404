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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from fediim.federated.bank import NOISE_ALPHA_GRID, BankConfig, BankError, ModelBank
from fediim.federated.engines import BankModels, CellPatternModels, pattern_models
from fediim.federated.fusion import (
    FUSION_STRENGTHS,
    choose_blend,
    fusion_predictions,
    site_coefficients,
)
from fediim.federated.plan import MODES, Mode, scale_to_bounds, unscale
from fediim.federated.principal import Frame
from fediim.impute.estimator import IIMImputer, empty_result, missing_patterns
from fediim.impute.iim import IIMConfig, PatternModels, PatternResult
from fediim.io.result import METHOD_FALLBACK, METHOD_IIM, METHOD_MEAN, ImputationResult

__all__ = ["BLEND_WEIGHTS", "ImputationJob", "JobEstimate", "SiteView", "impute_federated",
           "impute_hybrid", "impute_local", "impute_mean", "local_fallback", "site_impute"]

log = logging.getLogger(__name__)

#: Fewer validation rows than this: a site keeps the default bank configuration.
MIN_VALIDATION_ROWS = 20
#: Folds of the cross-fitting that keeps validated rows out of the models that predict them.
CROSSFIT_FOLDS = 5
#: From this many training rows on, the hybrid's cross-fitting (local IIM, fusion, the bank
#: side) holds every validation row out at once (one fold): at most ``n_validation`` rows
#: of so many barely change a fit, and each fold would refit over the whole table (or the
#: whole bank). The local model fitted without them then also imputes the job's rows.
ONE_FOLD_TRAINING_ROWS = 50_000
_WEIGHT_STEP = 0.1
#: Hybrid blend weights (local, one bank side, site mean) on a 0.1 grid of the simplex,
#: local-only first so that ties keep the site's own model.
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
        ``hybrid``: a blend of local, one side read off the bank (its models, the same at
        the site's own level, or their shrinkage fusion with the site's rows) and the
        site's mean, chosen on the site's own rows (see :func:`impute_hybrid`).
    n_neighbors : int, default=10
        Imputation neighbours, locally and in the bank (unless ``bank_config`` says).
    bank_config : BankConfig, optional
        How to read the bank; default ``BankConfig(n_neighbors=n_neighbors)``. A choice it
        leaves open (``engine="auto"`` on an exact bank, ``noise_alpha=None`` on a noised
        one) the site makes per job on its own rows (see :func:`bank_choices`).
    site_id : str, optional
        The site's id in the bank. With it, each validated row is first taken out of the
        site's own cell that holds it (or, where federated mode chooses its configuration
        on an exact bank, the other sites' cells are used), so that its own records do not
        flatter the bank's side.
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


def local_scaling(x: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the mean and spread (raw units) with which the site's own
    :class:`~fediim.impute.IIMImputer` over the columns it observes (the ``local``
    baseline) standardizes, to the last bit; a column the site never observes gets the
    centre and width of its public bounds.

    One bit of difference flips ties between equally near rows (coded columns), and with
    them neighbours, models and the small-pattern blend: the hybrid's local side would not
    be the local baseline.
    """
    mean, spread = bounds.mean(axis=1), bounds[:, 1] - bounds[:, 0]
    seen = np.flatnonzero(~np.isnan(x).all(axis=0))
    if seen.size:
        local = IIMImputer().fit(x[:, seen])
        mean[seen], spread[seen] = local.mean_, local.scale_
    return mean, spread


@dataclass(frozen=True)
class SiteView:
    """What every job of one :func:`site_impute` call reads, worked out once per call.

    scaled : the site's table in the bank's coordinates (public bounds to [-1/2, 1/2]).
    standardized : the site's table standardized as its ``local`` baseline does
        (:meth:`standardize`): the local side works there (the site's data never leave, so
        nothing here is private).
    center, scale : the same map in bank coordinates, ``standardized = (scaled - center)
        / scale`` inside the public bounds.
    local_mean, local_spread : that map in raw units (:func:`local_scaling`).
    missing : where the site's table is NaN.
    bounds : the public bounds per attribute.
    bank, others : the whole bank, and (made on first use) the bank without the site's
        records (the whole bank when the site has no id), on which federated mode chooses
        its configuration for an exact bank.
    config, choices : the bank configuration asked for, and those the site chooses
        between on its own rows (see :func:`bank_choices`).
    choose_config : whether there is a choice, and cells to make it on.
    shrink : federated mode on a noised single-tree bank with a known site: shrink towards
        the site's own mean (see :func:`shrink_target`, :func:`choose_shrinkage`) instead.
    federation_mean : the federation-wide mean per attribute, read off the bank (from the
        cells that measure it).
    local_config : the local side's IIM configuration.
    blend_weights : the hybrid blend's candidate weights (local, bank side, site mean).
    site_id : the site's id in the bank, if known.
    random_state : seeds each job's random choices (see :func:`site_impute`).
    """

    scaled: np.ndarray
    standardized: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    local_mean: np.ndarray
    local_spread: np.ndarray
    missing: np.ndarray
    bounds: np.ndarray
    bank: ModelBank
    config: BankConfig
    choices: list[BankConfig]
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
        mean, spread = local_scaling(x, bounds)
        lo, span = bounds[:, 0], bounds[:, 1] - bounds[:, 0]
        shrink = (mode != "hybrid" and site_id is not None and bank.n_trees == 1
                  and bool(np.any(bank.sigma > 0)))
        choices = site_choices(config, exact=bool(np.all(bank.sigma == 0)), shrink=shrink)
        return cls(
            scaled=scaled, standardized=(x - mean) / spread, center=(mean - lo) / span - 0.5,
            scale=spread / span, local_mean=mean, local_spread=spread,
            missing=np.isnan(x), bounds=bounds, bank=bank, config=config, choices=choices,
            shrink=shrink,
            federation_mean=bank.column_moments()[0],
            local_config=IIMConfig(n_neighbors=n_neighbors), blend_weights=blend_weights,
            site_id=site_id, random_state=random_state)

    @cached_property
    def others(self) -> ModelBank:
        """The bank without the site's own records (:func:`other_sites_bank`): only
        federated mode's configuration choice reads it, so it is made on first use."""
        return other_sites_bank(self.bank, self.site_id, self.scaled)

    @cached_property
    def choose_config(self) -> bool:
        """Whether there is a configuration to choose, and other sites' cells to choose it
        on."""
        return len(self.choices) > 1 and self.others.n_cells > 0

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """Rows ``x`` (raw) in the local side's coordinates, as the site's own table."""
        return (x - self.local_mean) / self.local_spread

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
    sites' cells (:func:`best_bank_config`). On a noised bank with a known site, it is
    chosen instead jointly with a weight that shrinks the estimate towards the site's own
    mean (:func:`shrink_target`, :func:`choose_shrinkage`), among IIM over cells and the
    tied cell mixture (:func:`site_choices`): noised cell models can be worse than
    that mean.
    """
    config = _federated_config(site, job)
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
    """``w_l * local + w_s * side + w_m * site mean``, the side and weights chosen per job.

    ``local`` is the site's own IIM; ``site mean`` its own mean; the side is one of
    :func:`hybrid_sides`: the bank's models as federated mode reads them, the same moved
    to the site's own level, or the shrinkage fusion of the site's rows with them at one
    prior strength. The choice (:func:`~fediim.federated.fusion.choose_blend`, weights from
    ``site.blend_weights``) is made on the job's validation rows, each predicted without
    itself (:func:`hybrid_validation`), and kept only where it beats local out of fold by
    a margin (:func:`~fediim.federated.fusion.choice_beats_local`); ties keep local. With
    weights (1, 0, 0) the job's cells are the site's ``local`` baseline itself (same
    scaling, models and small-pattern blend), below :data:`ONE_FOLD_TRAINING_ROWS`
    training rows.
    """
    validation = hybrid_validation(site, job)
    sides, labels = hybrid_sides(site, job, validation)
    side, weights = choose_blend(validation.local, sides, validation.site_mean,
                                 validation.truth, site.blend_weights)
    return _hybrid_estimate(site, job, weights, labels[side] if labels else None,
                            validation.local_model)


@dataclass(frozen=True)
class HybridValidation:
    """The job's validation rows and what predicts them, each without the row itself.

    truth : the target (bank coordinates).
    local : local IIM, cross-fitted (:func:`crossfitted_local_predictions`).
    site_mean : the site's mean over its other training rows.
    bank : the bank's model at each row (scaled coordinates, one per configuration of
        ``configs``), from the bank with the row out of its own cell
        (:func:`crossfitted_bank_coefficients`); None when the blend leaves the bank out.
    configs : the bank configurations the site chooses between.
    local_model : from :data:`ONE_FOLD_TRAINING_ROWS` training rows on, the local model
        fitted without the validation rows, which imputes the job's rows too; else None.
    """

    truth: np.ndarray
    local: np.ndarray
    site_mean: np.ndarray
    bank: np.ndarray | None
    configs: list[BankConfig]
    local_model: PatternModels | None = None


@dataclass(frozen=True)
class HybridSide:
    """A hybrid side: ``kind`` "bank" (plus ``bias``: "recentred") or "fusion" (at prior
    ``strength``), from the bank read with ``config``."""

    kind: str
    config: BankConfig
    bias: float = 0.0
    strength: float = 0.0


def hybrid_validation(site: SiteView, job: ImputationJob) -> HybridValidation:
    """Every validation prediction of the hybrid's fixed parts (see
    :class:`HybridValidation`)."""
    target, features = job.target, list(job.features)
    positions = np.searchsorted(job.train, job.validation)  # among the training rows
    local, local_model = crossfitted_local_predictions(
        site.standardized[np.ix_(job.train, features)], site.standardized[job.train, target],
        positions, site.local_config)
    local = local * site.scale[target] + site.center[target]
    truth, train_target = site.scaled[job.validation, target], site.scaled[job.train, target]
    site_mean = (train_target.sum() - truth) / max(len(train_target) - 1, 1)
    configs = (site.choices if len(site.choices) > 1
               and len(job.validation) >= MIN_VALIDATION_ROWS else [site.config])
    bank = None
    if site.blend_weights[:, 1].any():
        bank = crossfitted_bank_coefficients(
            site.bank, site.site_id, site.scaled[job.validation], target, job.features,
            configs, n_folds=crossfit_folds(len(job.train), len(job.validation)))
    return HybridValidation(truth, local, site_mean, bank, configs, local_model)


def hybrid_sides(site: SiteView, job: ImputationJob, validation: HybridValidation
                 ) -> tuple[np.ndarray, list[HybridSide]]:
    """The sides the hybrid chooses from, with their validation predictions (one row
    each): the bank read with the configuration that validates best, the same recentred
    by the site's mean residual (shared slopes, the site's own level: hospitals differ in
    case mix), and the shrinkage fusion at each of
    :data:`~fediim.federated.fusion.FUSION_STRENGTHS`."""
    truth = validation.truth
    if validation.bank is None:
        return np.zeros((0, len(truth))), []
    augmented = np.column_stack([np.ones(len(truth)), site.validation_queries(job)])
    predictions = np.einsum("qf,cqf->cq", augmented, validation.bank)
    best = int(np.argmin(((predictions - truth) ** 2).mean(axis=1)))  # ties: the first
    config, bank_side = validation.configs[best], predictions[best]
    residuals = truth - bank_side
    recentred = bank_side + (residuals.sum() - residuals) / (len(truth) - 1)
    fusion = crossfitted_fusion(site, job, validation.bank[best])
    labels = [HybridSide("bank", config), HybridSide("recentred", config,
                                                     bias=float(residuals.mean()))]
    labels += [HybridSide("fusion", config, strength=strength)
               for strength in FUSION_STRENGTHS]
    return np.vstack([bank_side, recentred, fusion]), labels


def crossfitted_fusion(site: SiteView, job: ImputationJob, bank_coefficients: np.ndarray
                       ) -> np.ndarray:
    """The shrinkage fusion's prediction of each validation row at each prior strength,
    shape (len(FUSION_STRENGTHS), n), from the site's rows without the row's fold, towards
    ``bank_coefficients`` (the bank's model at each row, made without the row)."""
    target, n_rows = job.target, len(job.validation)
    train = _training_system(site, job)
    positions = np.searchsorted(job.train, job.validation)
    prior = site_coefficients(bank_coefficients, site.center, site.scale, job.features,
                              target)
    n_folds = crossfit_folds(len(train), n_rows)
    folds = np.arange(n_rows) % max(n_folds, 1)
    predictions = np.empty((len(FUSION_STRENGTHS), n_rows))
    for fold in range(n_folds):
        held = folds == fold
        keep = np.ones(len(train), dtype=bool)
        keep[positions[held]] = False
        predictions[:, held] = fusion_predictions(
            train[keep], train[positions[held], 1:-1], prior[held], FUSION_STRENGTHS,
            _base_alpha(site))
    return predictions * site.scale[target] + site.center[target]


def _training_system(site: SiteView, job: ImputationJob) -> np.ndarray:
    """The job's training rows as ``(1, features, target)``, standardized coordinates."""
    return np.column_stack([np.ones(len(job.train)),
                            site.standardized[np.ix_(job.train, list(job.features))],
                            site.standardized[job.train, job.target]])


def _base_alpha(site: SiteView) -> float:
    """The fusion's base ridge penalty: the local side's smallest."""
    return float(site.local_config.alphas().min())


def _hybrid_estimate(site: SiteView, job: ImputationJob, weights: np.ndarray,
                     side: HybridSide | None, local_model: PatternModels | None = None
                     ) -> JobEstimate:
    """The chosen blend of the job's rows, with its spread and provenance; the local side
    from ``local_model``, else from the site's IIM over all the job's training rows."""
    target, features = job.target, list(job.features)
    scale, center = site.scale[target], site.center[target]
    if local_model is None:
        local_model = PatternModels(site.standardized[np.ix_(job.train, features)],
                                    site.standardized[job.train, target], site.local_config)
    local = local_model.impute(site.standardized[np.ix_(job.rows, features)])
    parts = [(weights[0], local.values * scale + center, local.spread * scale)]
    ell = weights[0] * local.ell.mean(axis=1)
    n_candidates = local.ell.shape[1]
    if weights[1] > 0 and side is not None:
        values, found = _side_estimate(site, job, side)
        parts.append((weights[1], values, found.spread))
        ell = ell + weights[1] * found.ell.mean(axis=1)
        n_candidates += found.ell.shape[1]
    site_mean = float(site.scaled[job.train, target].mean())
    parts.append((weights[2], np.full(len(job.rows), site_mean), np.zeros(len(job.rows))))
    values = sum(weight * part for weight, part, _ in parts)
    # Spread of the blend: within-part spreads plus disagreement between parts.
    spread = np.sqrt(sum(weight * (part_spread**2 + (part - values) ** 2)
                         for weight, part, part_spread in parts))
    return JobEstimate(values=values, spread=spread, ell=ell, n_candidates=n_candidates)


def _side_estimate(site: SiteView, job: ImputationJob, side: HybridSide
                   ) -> tuple[np.ndarray, PatternResult]:
    """A side's estimate of the job's rows (bank coordinates), and the bank's candidates
    behind it (their spread and provenance)."""
    models = pattern_models(site.bank, job.target, job.features, side.config)
    queries = site.queries(job)
    found = models.impute(queries)
    if side.kind != "fusion":
        return found.values + side.bias, found
    target = job.target
    prior = site_coefficients(models.coefficients(queries), site.center, site.scale,
                              job.features, target)
    fused = fusion_predictions(_training_system(site, job),
                               site.standardized[np.ix_(job.rows, list(job.features))],
                               prior, (side.strength,), _base_alpha(site))[0]
    return fused * site.scale[target] + site.center[target], found


def crossfitted_bank_coefficients(bank: ModelBank, site_id: str | None, rows: np.ndarray,
                                  target: int, features: tuple[int, ...],
                                  configs: list[BankConfig], n_folds: int = CROSSFIT_FOLDS
                                  ) -> np.ndarray:
    """The bank's model at each of the site's ``rows`` (bank coordinates, NaN where
    missing) for each configuration, shape (len(configs), n, len(features) + 1), each from
    the bank with the row taken out of its own cell, in ``n_folds`` folds (as
    :func:`leave_own_rows_out_predictions`). Without a site id, the bank as released."""
    own = own_cells(bank, site_id)
    _, cells, augmented = _rows_as_released(bank, own, rows)
    whole: list[BankModels] = []
    coefficients = np.empty((len(configs), len(rows), len(features) + 1))
    folds = np.arange(len(rows)) % n_folds
    for fold in range(min(n_folds, len(rows))):
        held = np.flatnonzero(folds == fold)
        if np.any(cells[held] >= 0):
            fold_bank = _bank_without_rows(bank, cells, augmented, held)
            models = models_per_config(fold_bank, target, features, configs)
        else:  # none of these rows was released: the bank as it is, fitted once
            whole = whole or models_per_config(bank, target, features, configs)
            models = whole
        queries = rows[np.ix_(held, list(features))]
        for number, model in enumerate(models):
            coefficients[number, held] = model.coefficients(queries)
    return coefficients


def _federated_config(site: SiteView, job: ImputationJob) -> BankConfig:
    """Federated mode's bank configuration for a job, chosen against the other sites'
    cells. The default configuration stands when there is nothing to choose, too few
    validation rows, or the shrinkage chooses instead."""
    if (not site.choose_config or site.shrink
            or len(job.validation) < MIN_VALIDATION_ROWS):
        return site.config
    return best_bank_config(site.others, job.target, job.features, site.choices,
                            site.validation_queries(job),
                            site.scaled[job.validation, job.target])


def site_choices(config: BankConfig, exact: bool, shrink: bool) -> list[BankConfig]:
    """The site's choices (:func:`bank_choices`); federated mode's on a noised bank
    (``shrink``) add the cell mixture with the federation's tied within-cell covariance
    (:func:`~fediim.federated.engines.tied_covariance`) when the engine is left open."""
    choices = bank_choices(config, exact)
    if shrink and not exact and config.engine == "auto":
        return [*choices, replace(config, engine="mixture")]
    return choices


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


def best_bank_config(others: ModelBank, target: int, features: tuple[int, ...],
                     choices: list[BankConfig], queries: np.ndarray, truth: np.ndarray
                     ) -> BankConfig:
    """The configuration whose models over ``others`` err least on the site's validation
    rows (``queries`` on the features, ``truth`` on the target). Ties: the first."""
    best: tuple[float, BankConfig] | None = None
    for config, models in zip(choices, models_per_config(others, target, features, choices),
                              strict=True):
        error = float(np.mean((models.impute(queries).values - truth) ** 2))
        if best is None or error < best[0]:
            best = (error, config)
    assert best is not None
    return best[1]


def crossfit_folds(n_train: int, n_validation: int) -> int:
    """Folds of the hybrid's cross-fitting (local, fusion, bank side):
    :data:`CROSSFIT_FOLDS` (at most one per validation row), or one from
    :data:`ONE_FOLD_TRAINING_ROWS` training rows on (every validation row held out at
    once)."""
    return min(1 if n_train >= ONE_FOLD_TRAINING_ROWS else CROSSFIT_FOLDS, n_validation)


def crossfitted_local_predictions(train_features: np.ndarray, train_target: np.ndarray,
                                  positions: np.ndarray, config: IIMConfig
                                  ) -> tuple[np.ndarray, PatternModels | None]:
    """Local IIM predictions of the training rows at ``positions``, each from models
    fitted without it, and from :data:`ONE_FOLD_TRAINING_ROWS` training rows on the one
    model fitted without them all (else None).

    K-fold cross-fitting (:func:`crossfit_folds`): excluding a row from its own neighbour
    list would not do, as its neighbours' models were learned *with* it, which flatters
    the local side, most on a small site.
    """
    predictions = np.empty(len(positions))
    n_folds = crossfit_folds(len(train_target), len(positions))
    folds = np.arange(len(positions)) % max(n_folds, 1)
    model = None
    for fold in range(n_folds):
        held = folds == fold
        keep = np.ones(len(train_target), dtype=bool)
        keep[positions[held]] = False
        if not keep.any():
            predictions[held] = 0.0  # the standardized site mean
            continue
        model = PatternModels(train_features[keep], train_target[keep], config)
        predictions[held] = model.impute(train_features[positions[held]]).values
    large = len(train_target) >= ONE_FOLD_TRAINING_ROWS
    return predictions, model if large and n_folds == 1 else None


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
    own = own_cells(bank, site_id)
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
    rows, cells, augmented = _rows_as_released(bank, own, rows)
    predictions = np.empty((len(choices), len(rows)))
    folds = np.random.default_rng(random_state).permutation(len(rows)) % CROSSFIT_FOLDS
    for fold in range(CROSSFIT_FOLDS):
        held = np.flatnonzero(folds == fold)
        without_fold = _bank_without_rows(bank, cells, augmented, held)
        queries = rows[np.ix_(held, list(features))]
        for number, models in enumerate(models_per_config(without_fold, target, features,
                                                          choices)):
            predictions[number, held] = models.impute(queries).values
    return predictions


def models_per_config(bank: ModelBank, target: int, features: tuple[int, ...],
                      configs: list[BankConfig]) -> list[BankModels]:
    """:func:`~fediim.federated.engines.pattern_models` for each configuration; where IIM
    over cells is read with configurations that differ only in their penalties (the
    noise multipliers a site chooses between), one neighbour search and pooling serves
    them all (:meth:`~fediim.federated.engines.CellPatternModels.with_penalties`)."""
    models: list[BankModels] = []
    for config in configs:
        first = models[0] if models else None
        if isinstance(first, CellPatternModels) and first.differs_only_in_penalties(config):
            models.append(first.with_penalties(config))
        else:
            models.append(pattern_models(bank, target, features, config))
    return models


def own_cells(bank: ModelBank, site_id: str | None) -> np.ndarray:
    """Bank indices of the cells that may hold the site's released rows: its own cells,
    or under secure aggregation every cell (each is a sum over the sites)."""
    if site_id is None:
        return np.zeros(0, dtype=np.int64)
    if bank.meta.get("aggregation") == "secure":
        return np.arange(bank.n_cells)
    return np.flatnonzero(bank.site == site_id)


def other_sites_bank(bank: ModelBank, site_id: str | None, scaled: np.ndarray) -> ModelBank:
    """The bank without the site's own records: its cells dropped, or under secure
    aggregation its released rows (``scaled``: all its rows, bank coordinates)
    subtracted from the summed cells they fell in."""
    if site_id is None:
        return bank
    if bank.meta.get("aggregation") != "secure":
        return bank.select(bank.site != site_id)
    rows, cells, augmented = _rows_as_released(bank, own_cells(bank, site_id), scaled.copy())
    return _bank_without_rows(bank, cells, augmented, np.arange(len(rows)))


def _rows_as_released(bank: ModelBank, own: np.ndarray, rows: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The site's ``rows`` as its release saw them (clamped to its clipping box, zero in
    the attributes it does not measure), the own cell holding each per tree
    (:func:`_own_cells_of_rows`) and the rows as ``(1, values)`` to subtract from them."""
    frame = bank.frame
    if frame is not None:  # cells cut in the principal-axis frame: clamped there
        return _framed_rows_as_released(bank, frame, own, rows)
    if own.size:
        rows = np.clip(rows, bank.clip_lo[own[0]], bank.clip_hi[own[0]])
        rows[:, ~bank.observed[own[0]]] = 0.0
    cells = _own_cells_of_rows(bank, own, rows)
    return rows, cells, np.column_stack([np.ones(len(rows)), np.nan_to_num(rows)])


def _framed_rows_as_released(bank: ModelBank, frame: Frame, own: np.ndarray,
                             rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_rows_as_released` for a bank cut in ``frame``: each complete row clamped to
    the frame's box (and the clipping box in it), its cell found there, and the row as
    released mapped back; rows with a gap (never released) stay as they are."""
    z = frame.to_frame(rows)
    if own.size:
        z = np.clip(z, bank.clip_lo[own[0]], bank.clip_hi[own[0]])
    cells = _own_cells_of_rows(bank, own, z)
    complete = ~np.isnan(rows).any(axis=1)
    released = rows.copy()
    released[complete] = frame.from_frame(z[complete])
    return released, cells, np.column_stack([np.ones(len(rows)), np.nan_to_num(released)])


def _bank_without_rows(bank: ModelBank, cells: np.ndarray, augmented: np.ndarray,
                       rows: np.ndarray) -> ModelBank:
    """The bank with each of the site's ``rows`` (indices into ``augmented``, the rows as
    ``(1, values)``) subtracted from its own cell in every tree (``cells``, see
    :func:`_own_cells_of_rows`)."""
    gram = bank.gram.copy()
    for cell in cells.T:
        released = rows[cell[rows] >= 0]
        np.subtract.at(gram, cell[released],
                       augmented[released, :, None] * augmented[released, None, :])
    # A noised count can fall below zero once rows are out: such a cell is noise only.
    gram[:, 0, 0] = np.maximum(gram[:, 0, 0], 1e-9)
    return ModelBank(n_features=bank.n_features, site=bank.site, cell=bank.cell, lo=bank.lo,
                     hi=bank.hi, gram=gram, sigma=bank.sigma, min_records=0, tree=bank.tree,
                     clip_lo=bank.clip_lo, clip_hi=bank.clip_hi, observed=bank.observed,
                     meta=dict(bank.meta))


def _own_cells_of_rows(bank: ModelBank, own: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row and tree, the bank index of the site's cell that holds it (-1: not
    released), shape (len(rows), bank.n_trees): a released row is in one cell per tree."""
    return np.column_stack([_own_cell_of_rows(bank, own[bank.tree[own] == tree], rows)
                            for tree in range(bank.n_trees)])


def _own_cell_of_rows(bank: ModelBank, own: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row, the bank index of the site's cell (among ``own``, cells of one tree) that
    holds it (-1: not released)."""
    released = np.flatnonzero(~np.isnan(rows).any(axis=1))
    complete = rows[released]
    inside = np.ones((len(released), own.size), dtype=bool)
    for column in range(bank.n_features):  # a released row lies in at most one own cell
        values = complete[:, [column]]
        inside &= (values >= bank.lo[own, column]) & (
            (values < bank.hi[own, column])
            | (bank.hi[own, column] >= bank.clip_hi[own, column]))
    cell = np.full(len(rows), -1)
    if own.size:
        cell[released] = np.where(inside.any(axis=1), own[inside.argmax(axis=1)], -1)
    return cell
