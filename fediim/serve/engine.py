"""The site's imputation engine for serving: everything that can be, built once.

:func:`~fediim.federated.site_impute` works out a site's choices (bank configuration,
hybrid blend, shrinkage) and fits its models on every call. A service imputes a few rows
per request, day after day, from the same bank and the same site rows, so
:class:`ServingEngine` makes those choices and fits those models once per
(observed features, target) key, from the site's *reference* rows (its table of the last
run), and per call only imputes the rows it is given. On the reference rows themselves
its numbers are :func:`site_impute`'s (``tests/serve/test_engine.py`` pins that).

Where the bank cannot impute a cell (the row observes no attribute, or the bank's models
fail numerically on its key), the cell gets a *fallback*: the site's own mean of the
column, or the bank's mean where the site never measures it, marked ``fallback``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fediim.federated.bank import BankConfig, ModelBank
from fediim.federated.engines import BankModels, pattern_models
from fediim.federated.fusion import choose_blend, fusion_predictions, site_coefficients
from fediim.federated.plan import MODES, Mode, scale_to_bounds, unscale
from fediim.federated.site_imputation import (
    BLEND_WEIGHTS,
    MIN_VALIDATION_ROWS,
    NUMERICAL_FAILURES,
    HybridSide,
    ImputationJob,
    JobEstimate,
    SiteView,
    best_bank_config,
    choose_shrinkage,
    hybrid_sides,
    hybrid_validation,
    shrink_target,
)
from fediim.impute.estimator import IIMImputer, empty_result, missing_patterns
from fediim.impute.iim import PatternModels
from fediim.io.result import (
    METHOD_BANK,
    METHOD_FALLBACK,
    METHOD_HYBRID,
    METHOD_MEAN,
    ImputationResult,
)

__all__ = ["Key", "ServingEngine", "all_keys"]

log = logging.getLogger(__name__)

#: (observed features, target): what a cell's imputation depends on besides the row.
Key = tuple[tuple[int, ...], int]
#: Training rows whose individual models are learned per batch while warming a key.
_LEARN_CHUNK = 512


def all_keys(n_columns: int) -> list[Key]:
    """Every key of a table with ``n_columns`` columns (at least one feature)."""
    keys: list[Key] = []
    for mask in range(1, 2**n_columns - 1):
        features = tuple(c for c in range(n_columns) if mask >> c & 1)
        keys += [(features, t) for t in range(n_columns) if not mask >> t & 1]
    return keys


class _Plan:
    """How one key's cells are imputed: ``estimate`` maps the rows' queries to a
    :class:`JobEstimate` in the bank's coordinates."""

    method = METHOD_BANK
    #: Cross-fitted RMSE of the plan on the site's validation rows (bank coordinates),
    #: where the plan measured it: the baseline of the monitored error.
    baseline_rmse: float | None = None

    def estimate(self, scaled: np.ndarray, standardized: np.ndarray) -> JobEstimate:
        raise NotImplementedError

    def warm(self) -> None:
        """Learn every model the plan may use, so that a call only reads them."""


def _learn_all(models: PatternModels) -> None:
    for start in range(0, models.n_rows, _LEARN_CHUNK):
        models.chosen_models(np.arange(start, min(start + _LEARN_CHUNK, models.n_rows)))


class _HybridPlan(_Plan):
    """``hybrid``: the blend of local IIM, one bank side and the site's mean that the
    site's validation rows chose (:func:`~fediim.federated.site_imputation.impute_hybrid`),
    with its local and bank models fitted once."""

    method = METHOD_HYBRID

    def __init__(self, site: SiteView, job: ImputationJob) -> None:
        validation = hybrid_validation(site, job)
        sides, labels = hybrid_sides(site, job, validation)
        chosen, weights = choose_blend(validation.local, sides, validation.site_mean,
                                       validation.truth, site.blend_weights)
        side_row = sides[chosen] if len(sides) else np.zeros_like(validation.truth)
        blend = (weights[0] * validation.local + weights[1] * side_row
                 + weights[2] * validation.site_mean)
        self.baseline_rmse = float(np.sqrt(np.mean((blend - validation.truth) ** 2)))
        self.weights, self.side = weights, labels[chosen] if labels else None
        target, features = job.target, list(job.features)
        self.target, self.features = target, job.features
        self.scale, self.center = site.scale[target], site.center[target]
        self.local = PatternModels(site.standardized[np.ix_(job.train, features)],
                                   site.standardized[job.train, target], site.local_config)
        self.site_mean = float(site.scaled[job.train, target].mean())
        self.bank_models: BankModels | None = None
        if weights[1] > 0 and self.side is not None:
            self.bank_models = pattern_models(site.bank, target, job.features,
                                              self.side.config)
        self.train_system = np.column_stack([
            np.ones(len(job.train)), site.standardized[np.ix_(job.train, features)],
            site.standardized[job.train, target]])
        self.site_center, self.site_scale = site.center, site.scale
        self.base_alpha = float(site.local_config.alphas().min())

    def warm(self) -> None:
        _learn_all(self.local)

    def _side(self, scaled: np.ndarray, standardized: np.ndarray, side: HybridSide
              ) -> tuple[np.ndarray, JobEstimate]:
        assert self.bank_models is not None
        found = self.bank_models.impute(scaled)
        estimate = JobEstimate(found.values, found.spread, found.ell.mean(axis=1),
                               found.ell.shape[1])
        if side.kind != "fusion":
            return found.values + side.bias, estimate
        prior = site_coefficients(self.bank_models.coefficients(scaled), self.site_center,
                                  self.site_scale, self.features, self.target)
        fused = fusion_predictions(self.train_system, standardized, prior,
                                   (side.strength,), self.base_alpha)[0]
        return fused * self.scale + self.center, estimate

    def estimate(self, scaled: np.ndarray, standardized: np.ndarray) -> JobEstimate:
        weights, n_rows = self.weights, len(scaled)
        local = self.local.impute(standardized)
        parts = [(weights[0], local.values * self.scale + self.center,
                  local.spread * self.scale)]
        ell = weights[0] * local.ell.mean(axis=1)
        n_candidates = local.ell.shape[1]
        if weights[1] > 0 and self.side is not None:
            values, found = self._side(scaled, standardized, self.side)
            parts.append((weights[1], values, found.spread))
            ell = ell + weights[1] * found.ell
            n_candidates += found.n_candidates
        parts.append((weights[2], np.full(n_rows, self.site_mean), np.zeros(n_rows)))
        values = sum(weight * part for weight, part, _ in parts)
        spread = np.sqrt(sum(weight * (part_spread**2 + (part - values) ** 2)
                             for weight, part, part_spread in parts))
        return JobEstimate(values=values, spread=spread, ell=ell, n_candidates=n_candidates)


class _FederatedPlan(_Plan):
    """``federated`` (and ``hybrid`` where the site has at most one training row): the
    bank's cell models, with the configuration and shrinkage the site chose
    (:func:`~fediim.federated.site_imputation.impute_federated`), fitted once."""

    def __init__(self, site: SiteView, job: ImputationJob) -> None:
        config = site.config
        if (site.choose_config and not site.shrink
                and len(job.validation) >= MIN_VALIDATION_ROWS):
            config = best_bank_config(site.others, job.target, job.features, site.choices,
                                      site.validation_queries(job),
                                      site.scaled[job.validation, job.target])
        self.weight, self.mean = 1.0, shrink_target(site, job)
        if site.shrink:
            assert site.site_id is not None  # site.shrink needs it
            observed = site.scaled[job.train, job.target]
            mean_without_row = (observed.sum() - observed) / max(len(observed) - 1, 1)
            config, self.weight = choose_shrinkage(
                site.bank, site.site_id, job.target, job.features, site.choices,
                site.scaled[job.train], mean_without_row, site.random_state)
        self.models = pattern_models(site.bank, job.target, job.features, config)

    def estimate(self, scaled: np.ndarray, standardized: np.ndarray) -> JobEstimate:
        found = self.models.impute(scaled)
        return JobEstimate(values=self.weight * found.values + (1 - self.weight) * self.mean,
                           spread=self.weight * found.spread, ell=found.ell.mean(axis=1),
                           n_candidates=found.ell.shape[1])


class _MeanPlan(_Plan):
    """``mean`` mode: the federation's mean read off the bank (or ``fallback``: the
    site's own mean where it measures the column, else the bank's)."""

    def __init__(self, mean: float, method: str) -> None:
        self.mean, self.method = mean, method

    def estimate(self, scaled: np.ndarray, standardized: np.ndarray) -> JobEstimate:
        n_rows = len(scaled)
        return JobEstimate(values=np.full(n_rows, self.mean), spread=np.zeros(n_rows),
                           ell=np.full(n_rows, np.nan), n_candidates=0)


@dataclass(frozen=True)
class EngineSettings:
    """How the engine reads the bank: the arguments of
    :func:`~fediim.federated.site_impute` it keeps fixed."""

    mode: Mode = "hybrid"
    n_neighbors: int = 10
    site_id: str | None = None
    n_validation: int = 400
    random_state: int = 0


class ServingEngine:
    """A site's imputation from the federation's bank, prepared once, imputing any rows.

    Parameters
    ----------
    reference : ndarray of shape (n, m)
        The site's own rows (NaN where missing): its evidence for the local side, the
        validation rows of its choices, its means.
    bank : ModelBank
        The federation's (verified) bank; not read in ``local`` mode.
    bounds : ndarray of shape (m, 2)
        The schema's public bounds.
    settings : EngineSettings
        Mode, neighbours, the site's id in the bank and the validation draw.

    A key's plan is made on first use (or by :meth:`warm`) and kept; calls are serialised
    by a lock, so one engine may serve several threads.
    """

    def __init__(self, reference: np.ndarray, bank: ModelBank, bounds: np.ndarray,
                 settings: EngineSettings | None = None) -> None:
        self.settings = settings = settings or EngineSettings()
        if settings.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {settings.mode!r}")
        reference = np.asarray(reference, dtype=np.float64)
        #: The site's own rows the engine was prepared on (never sent anywhere).
        self.reference = reference
        self.bounds, self.n_columns = np.asarray(bounds, dtype=np.float64), reference.shape[1]
        self._lock = threading.Lock()
        self._plans: dict[Key, _Plan] = {}
        self._missing = np.isnan(reference)
        self._local: IIMImputer | None = None
        if settings.mode == "local":
            self._local = IIMImputer(n_neighbors=settings.n_neighbors).fit(reference)
        self.site = SiteView.build(
            reference, bank, self.bounds, mode=settings.mode,
            n_neighbors=settings.n_neighbors, site_id=settings.site_id,
            config=BankConfig(n_neighbors=settings.n_neighbors),
            random_state=settings.random_state, blend_weights=BLEND_WEIGHTS)
        measured = (~self._missing).any(axis=0)
        #: The fallback per column (bank coordinates): the site's mean, else the bank's.
        self.fallback_mean = np.where(measured, self.site.center, self.site.federation_mean)

    # -- plans ---------------------------------------------------------------------
    def _job(self, key: Key) -> ImputationJob:
        features, target = key
        observed = (~self._missing[:, list(features)]).all(axis=1)
        train = np.flatnonzero(observed & ~self._missing[:, target])
        validation = np.random.default_rng(self.settings.random_state).permutation(
            train)[:self.settings.n_validation]
        return ImputationJob(np.zeros(0, dtype=np.intp), target, features, train, validation)

    def _make_plan(self, key: Key) -> _Plan:
        features, target = key
        fallback = _MeanPlan(float(self.fallback_mean[target]), METHOD_FALLBACK)
        if self.settings.mode == "mean":
            return _MeanPlan(float(self.site.federation_mean[target]), METHOD_MEAN)
        if not features:
            return fallback
        job = self._job(key)
        try:
            if self.settings.mode == "hybrid" and len(job.train) > 1:
                plan: _Plan = _HybridPlan(self.site, job)
            else:
                plan = _FederatedPlan(self.site, job)
            plan.warm()
        except NUMERICAL_FAILURES as exc:
            log.warning("the bank's models failed for one key (%s); its cells get the "
                        "fallback", type(exc).__name__)
            return fallback
        return plan

    def plan(self, key: Key) -> _Plan:
        """The plan of ``key``, made and kept on first use."""
        if key not in self._plans:
            self._plans[key] = self._make_plan(key)
        return self._plans[key]

    def warm(self, keys: Iterable[Key]) -> int:
        """Make the plans of ``keys`` now (start-up), so that calls only read them; returns
        how many plans the engine holds."""
        with self._lock:
            for key in keys:
                if self._local is None:
                    self.plan(key)
                elif (models := self._local.pattern(key[1], key[0])) is not None:
                    _learn_all(models)
            return len(self._plans)

    @property
    def n_plans(self) -> int:
        """How many plans the engine holds."""
        return len(self._plans)

    def baseline_rmse(self, target: int) -> float | None:
        """The cross-fitted RMSE (bank coordinates) of the plan for ``target`` from every
        other column, where known: what monitoring compares the live error with."""
        with self._lock:
            features = tuple(c for c in range(self.n_columns) if c != target)
            return self.plan((features, target)).baseline_rmse if features else None

    # -- imputation ----------------------------------------------------------------
    def impute(self, x: np.ndarray) -> ImputationResult:
        """Impute the rows of ``x`` (n, m), NaN where missing; observed cells are copied.

        Methods per imputed cell: ``hybrid``, ``bank`` (the bank's models), ``iim``
        (``local`` mode), ``mean`` (``mean`` mode) or ``fallback``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_columns:
            raise ValueError(f"rows must have {self.n_columns} columns, got shape {x.shape}")
        with self._lock:
            if self._local is not None:
                return self._impute_local(x)
            result = empty_result(x)
            scaled, _ = scale_to_bounds(x, self.bounds)
            standardized = self.site.standardize(x)
            for rows, features, targets in missing_patterns(result.imputed):
                for target in targets:
                    self._fill(result, rows, (features, target), scaled, standardized)
            return result

    def _fill(self, result: ImputationResult, rows: np.ndarray, key: Key,
              scaled: np.ndarray, standardized: np.ndarray) -> None:
        features, target = key
        plan = self.plan(key)
        queries = np.ix_(rows, list(features))
        try:
            found = plan.estimate(scaled[queries], standardized[queries])
            ok = np.all(np.isfinite(found.values)) and np.all(np.isfinite(found.spread))
        except NUMERICAL_FAILURES as exc:
            log.warning("the bank's models failed on one request (%s); the fallback fills "
                        "its cells", type(exc).__name__)
            ok = False
        if not ok:
            plan = _MeanPlan(float(self.fallback_mean[target]), METHOD_FALLBACK)
            found = plan.estimate(scaled[queries], standardized[queries])
        bounds = self.bounds
        result.values[rows, target] = unscale(np.clip(found.values, -0.5, 0.5), bounds, target)
        result.uncertainty[rows, target] = found.spread * (bounds[target, 1] - bounds[target, 0])
        result.method[rows, target] = plan.method
        result.ell[rows, target] = found.ell
        result.n_candidates[rows, target] = found.n_candidates

    def _impute_local(self, x: np.ndarray) -> ImputationResult:
        """``local`` mode: the site's own IIM, fitted once on the reference rows; a cell
        without a usable training row gets the site's mean, marked ``fallback``."""
        assert self._local is not None
        result = self._local.impute(x)
        result.method[result.method == METHOD_MEAN] = METHOD_FALLBACK
        return result
