"""``FederatedIIM``: private federated IIM in one process, each array one site."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from fediim.errors import DataError
from fediim.federated.bank import ModelBank
from fediim.federated.multiple import site_draws
from fediim.federated.plan import MODES, PLAN_DEFAULTS, Mode, PrivacyPlan, plan_privacy
from fediim.federated.release import assemble_bank, site_release
from fediim.federated.secure_release import (
    AGGREGATIONS,
    MIN_SECURE_SITES,
    SecureSettings,
    SiteShares,
    default_threshold,
    secure_bank,
)
from fediim.federated.site_imputation import site_impute
from fediim.impute.encoding import MixedEncoding, fit_encoding, table_codes
from fediim.io.result import ImputationResult
from fediim.io.table import as_matrix
from fediim.privacy import PrivacyLedger, SeededGaussianNoise

__all__ = ["FederatedIIM"]


class FederatedIIM(BaseEstimator):
    """Private federated IIM over several sites' tables, run in one process.

    Every site releases, under its own (epsilon, delta) budget, a private partition of its
    complete records and the noised Gram matrices of the partition's cells; together the
    cells form the federation's model bank. Each site then imputes its own rows from the
    bank locally (:func:`~fediim.federated.site_impute`), so queries never leave a site.
    ``fit`` and ``transform`` take a list of arrays, one per site, with the same columns.

    Parameters
    ----------
    n_neighbors : int, default=10
        Imputation neighbours: anchors in the bank, and rows of a site's own IIM.
    epsilon : float, default=1.0
        Each site's privacy budget for this fit ((epsilon, delta)-DP through rho-zCDP).
        ``np.inf`` releases exact statistics (same cells and bank, no noise).
    delta : float, default=1e-6
        Each site's delta, in (0, 1).
    bounds : array-like of shape (n_features, 2), default=None
        Public lower and upper bound per attribute (domain knowledge, not data). Required
        unless ``epsilon`` is inf; then read from the data, which is not private.
    mode : {"hybrid", "federated", "local", "mean"}, default="hybrid"
        How each site imputes (see :data:`~fediim.federated.plan.MODES`).
    min_records : int, default=10
        No cell in the bank describes fewer records (by its noisy count).
    count_fraction : float, default=0.1
        Share of the budget spent on the partition's noisy counts.
    max_depth : int or None, default=None
        The partition's depth cap; ``None`` picks by budget (see
        :func:`~fediim.federated.plan_privacy`).
    cell_noise_ratio : float, default=4.0
        A cell is split only while its children keep this many Gram noise standard
        deviations of records.
    n_trees : int or None, default=None
        Differently cut partitions released per site; ``None`` picks by budget.
    clip_fraction : float, default=0.1
        Share of each site's budget spent on its private clipping box (per-column
        quantiles inside ``bounds``); 0 clamps to ``bounds`` only.
    principal_axes : bool, default=True
        Under secure sums, spend ``clip_fraction`` on the federation's moments and cut the
        shared partition along their principal axes instead of clipping per column
        (:mod:`~fediim.federated.principal`); per-site releases ignore it.
    aggregation : {"auto", "secure", "per-site"}, default="auto"
        How the sites release: ``"secure"`` sums their statistics across sites (secure
        aggregation: every cell of the bank is a sum over the sites, each site adding a
        share of the noise; :mod:`~fediim.federated.secure_release`), ``"per-site"``
        has each site release its own cells, ``"auto"`` sums securely from 3 sites on.
    threshold : int or None, default=None
        Secure aggregation only: every sum must hold the noise of at least this many sites
        (so ``n_sites - threshold`` may drop out or collude); ``None`` is two thirds of the
        sites, at least 2.
    clip_columns : array-like of bool of shape (n_features,), default=None
        Which columns the box may narrow (default: all). Leave out columns holding codes
        (binary or categorical values): a noisy quantile between two codes would clamp
        half the records.
    seed : int or None, default=None
        Seeds a numpy noise source for reproducible *simulations*. ``None`` draws the
        privacy noise with OpenDP's exact sampler, as a deployment must.
    random_state : int or None, default=0
        Seeds the sites' random choices while imputing (which rows validate, how they are
        split into folds) and the draws of :meth:`multiple_imputations`; it never touches
        the privacy noise (see ``seed``).
    n_imputations : int, default=1
        M, the completed tables per site :meth:`multiple_imputations` draws: each from a
        bank re-noised at the release's noise scale, plus the residual noise the site
        measures on its own rows, or, for a binary or categorical cell, a level drawn
        from its level probabilities (see :mod:`fediim.federated.multiple`;
        post-processing, no privacy cost). ``transform`` always gives the single
        imputation.
    k : int or None, default=None
        Deprecated alias of ``n_neighbors``; if given it overrides it, with a
        ``FutureWarning``.
    column_kinds : mapping, optional
        Coded columns, ``{column: (kind, levels)}`` as in :class:`~fediim.IIMImputer`;
        the levels must be declared (they are public, like ``bounds``) unless
        ``epsilon`` is inf. Every site encodes with them (:mod:`fediim.impute.encoding`),
        the bank is released over the encoded columns with the one-hot sensitivity of
        :func:`~fediim.federated.release.coded_gram_sensitivity`, and each site decodes
        its own imputations into declared levels. Their rows of ``bounds`` are ignored and
        they are never clipped. Secure sums (``"secure"``, or ``"auto"`` from 3 sites, as
        in the Flower apps) sum the encoded tables with the same one-hot sensitivity.

    Attributes
    ----------
    bank_ : ModelBank
        The federation's bank: every site's released cells.
    bounds_ : ndarray of shape (n_features, 2)
        The bounds the sites scaled their records into.
    ledgers_ : list of PrivacyLedger or None
        One ledger per site (``None`` where statistics are exact: no budget to keep).
    plan_ : PrivacyPlan
        How each site's budget was split.
    site_ids_ : list of str
        The sites' ids in the bank.
    n_features_in_ : int
        Number of columns of every site's table.
    encoding_ : MixedEncoding or None
        The columns' encoding (None: every column numeric); ``bounds_`` and the bank are
        then over its encoded columns.

    See Also
    --------
    fediim.IIMImputer : the centralized IIM engine, for one table.
    fediim.federated.site_impute : one site's imputation from a bank.
    fediim.federated.plan_privacy : how a site's budget is split.

    Examples
    --------
    >>> import numpy as np
    >>> from fediim import FederatedIIM
    >>> rng = np.random.default_rng(0)
    >>> def hospital(n):
    ...     age = rng.uniform(20, 80, n)
    ...     table = np.column_stack([age, 2 * age + rng.normal(0, 5, n)])
    ...     table[rng.random(n) < 0.1, 1] = np.nan
    ...     return table
    >>> sites = [hospital(300), hospital(200)]
    >>> model = FederatedIIM(epsilon=4.0, bounds=[[0, 100], [0, 200]], seed=0)
    >>> imputed = model.fit_transform(sites)
    >>> [int(np.isnan(table).sum()) for table in imputed]
    [0, 0]
    >>> model.site_ids_, model.plan_.n_trees
    (['site0', 'site1'], 1)

    Multiple imputation (M completed federations, each from a re-noised bank):

    >>> drawn = model.set_params(n_imputations=2).multiple_imputations(sites)
    >>> len(drawn), [int(np.isnan(table).sum()) for table in drawn[1]]
    (2, [0, 0])
    """

    def __init__(
        self,
        *,
        n_neighbors: int = 10,
        epsilon: float = 1.0,
        delta: float = 1e-6,
        bounds: np.ndarray | None = None,
        mode: Mode = "hybrid",
        min_records: int = PLAN_DEFAULTS.min_records,
        count_fraction: float = PLAN_DEFAULTS.count_fraction,
        max_depth: int | None = PLAN_DEFAULTS.max_depth,
        cell_noise_ratio: float = PLAN_DEFAULTS.cell_noise_ratio,
        n_trees: int | None = PLAN_DEFAULTS.n_trees,
        clip_fraction: float = PLAN_DEFAULTS.clip_fraction,
        principal_axes: bool = PLAN_DEFAULTS.principal_axes,
        clip_columns: np.ndarray | None = None,
        aggregation: str = "auto",
        threshold: int | None = None,
        seed: int | None = None,
        random_state: int | None = 0,
        n_imputations: int = 1,
        k: int | None = None,
        column_kinds: dict[Any, Any] | None = None,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.epsilon = epsilon
        self.delta = delta
        self.bounds = bounds
        self.mode = mode
        self.min_records = min_records
        self.count_fraction = count_fraction
        self.max_depth = max_depth
        self.cell_noise_ratio = cell_noise_ratio
        self.n_trees = n_trees
        self.clip_fraction = clip_fraction
        self.principal_axes = principal_axes
        self.clip_columns = clip_columns
        self.aggregation = aggregation
        self.threshold = threshold
        self.seed = seed
        self.random_state = random_state
        self.n_imputations = n_imputations
        self.k = k
        self.column_kinds = column_kinds

    # -- fitting ------------------------------------------------------------------------
    def fit(self, sites: Sequence[np.ndarray], site_ids: Sequence[str] | None = None,
            ledgers: Sequence[PrivacyLedger | None] | None = None) -> FederatedIIM:
        """Release every site's cells (charged to its ledger) and assemble the bank.

        ``site_ids`` default to ``site0, site1, ...``; ``ledgers`` (one per site, each
        charged before any noise is drawn) default to fresh in-memory ledgers holding
        exactly this fit's budget.
        """
        self._validate_params()
        self.encoding_ = self._fit_encoding(sites)
        sites = self._tables(sites)
        if not sites or len({table.shape[1] for table in sites}) != 1:
            raise ValueError("sites must be a non-empty list of arrays with the same columns")
        self.n_features_in_ = sites[0].shape[1]
        self.bounds_ = self._bounds(sites)
        if self.encoding_ is not None:
            return self._fit_encoded(sites, site_ids, ledgers)
        self.site_ids_ = (list(site_ids) if site_ids
                          else [f"site{number}" for number in range(len(sites))])
        self.plan_ = self._plan()
        self.ledgers_ = list(ledgers) if ledgers is not None else self._fresh_ledgers()
        if self._secure(len(sites)):
            self.bank_ = self._secure_bank(sites)
            return self
        releases = [
            site_release(table, self.bounds_, self.plan_, site_id=site_id, ledger=ledger,
                         noise=noise, clip_columns=self.clip_columns)
            for table, site_id, ledger, noise in zip(
                sites, self.site_ids_, self.ledgers_, self._noise_sources(len(sites)),
                strict=True)]
        self.bank_ = assemble_bank(releases, meta={"epsilon": self.epsilon, "delta": self.delta})
        return self

    def _fit_encoding(self, sites: Sequence[Any]) -> MixedEncoding | None:
        """The columns' encoding from ``column_kinds`` (None: every column numeric); a
        private fit needs every coded column's levels declared."""
        if not self.column_kinds or not len(sites):
            return None
        lacking = [key for key, spec in self.column_kinds.items()
                   if isinstance(spec, str) and spec != "numeric"]
        if lacking and np.isfinite(self.epsilon):
            raise ValueError(f"column_kinds: columns {lacking} need declared levels, (kind, "
                             "levels), for a private fit: levels read from the data are "
                             "not private")
        # Undeclared levels (exact statistics only) are the first site's labels.
        return fit_encoding(sites[0], self.column_kinds)

    def _tables(self, sites: Sequence[Any]) -> list[np.ndarray]:
        """Each site's table as floats, coded columns as level codes."""
        if self.encoding_ is None:
            return _site_tables(sites)
        coded = []
        for number, table in enumerate(sites):
            try:
                coded.append(table_codes(table, self.encoding_))
            except ValueError as exc:
                raise ValueError(f"site {number}: {exc}") from None
        return _site_tables(coded)

    def _fit_encoded(self, sites: list[np.ndarray], site_ids: Sequence[str] | None,
                     ledgers: Sequence[PrivacyLedger | None] | None) -> FederatedIIM:
        """:meth:`fit` with coded columns: every site releases its encoded table, the
        one-hot blocks in public coordinates (sensitivity of the m table columns)."""
        encoding = self.encoding_
        assert encoding is not None
        bounds = encoding.encoded_bounds(self.bounds_)
        clip = encoding.encoded_flags(self.clip_columns)
        self.site_ids_ = (list(site_ids) if site_ids
                          else [f"site{number}" for number in range(len(sites))])
        # One-hot blocks count as one column each: the plan's noise is the m columns'.
        self.plan_ = self._plan()
        self.ledgers_ = list(ledgers) if ledgers is not None else self._fresh_ledgers()
        self.bounds_ = bounds
        if self._secure(len(sites)):
            self.bank_ = self._secure_bank([encoding.encode(table) for table in sites],
                                           clip, encoding.onehot_blocks())
            return self
        releases = [
            site_release(encoding.encode(table), bounds, self.plan_, site_id=site_id,
                         ledger=ledger, noise=noise, clip_columns=clip,
                         onehot_blocks=encoding.onehot_blocks())
            for table, site_id, ledger, noise in zip(
                sites, self.site_ids_, self.ledgers_, self._noise_sources(len(sites)),
                strict=True)]
        self.bank_ = assemble_bank(releases, meta={"epsilon": self.epsilon, "delta": self.delta})
        return self

    def _plan(self) -> PrivacyPlan:
        """Each site's budget split for the table's ``n_features_in_`` columns."""
        return plan_privacy(
            self.epsilon, self.delta, self.n_features_in_, min_records=self.min_records,
            count_fraction=self.count_fraction, max_depth=self.max_depth,
            cell_noise_ratio=self.cell_noise_ratio, n_trees=self.n_trees,
            clip_fraction=self.clip_fraction, principal_axes=bool(self.principal_axes))

    def _secure(self, n_sites: int) -> bool:
        """Whether the sites sum their statistics securely (``auto``: from 3 sites)."""
        return self.aggregation == "secure" or (
            self.aggregation == "auto" and n_sites >= MIN_SECURE_SITES)

    def _secure_bank(self, sites: list[np.ndarray], clip_columns: np.ndarray | None = None,
                     onehot_blocks: Sequence[Sequence[int]] = ()) -> ModelBank:
        """The bank from the three secure sums (:mod:`~fediim.federated.secure_release`)
        over the (encoded) tables ``sites`` within ``bounds_``; ``clip_columns`` default
        to the estimator's."""
        threshold = (default_threshold(len(sites)) if self.threshold is None
                     else self.threshold)
        settings = SecureSettings(len(sites), threshold)
        shares = {
            site_id: SiteShares.from_table(table, self.bounds_, self.plan_, settings,
                                           site_id=site_id, ledger=ledger, noise=noise,
                                           clip_columns=(self.clip_columns if clip_columns
                                                         is None else clip_columns),
                                           onehot_blocks=onehot_blocks)
            for table, site_id, ledger, noise in zip(
                sites, self.site_ids_, self.ledgers_, self._noise_sources(len(sites)),
                strict=True)}
        bank = secure_bank(shares, self.plan_, settings)
        bank.meta.update({"epsilon": self.epsilon, "delta": self.delta})
        return bank

    def _validate_params(self) -> None:
        """Check every parameter once, at ``fit``, naming the one at fault."""
        self._n_neighbors = self._resolve_n_neighbors()
        epsilon = self.epsilon
        if not isinstance(epsilon, Real) or math.isnan(epsilon) or epsilon <= 0:
            raise ValueError(f"epsilon must be a number > 0 (or inf), got {epsilon!r}")
        if not isinstance(self.delta, Real) or not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got "
                             f"{self.aggregation!r}")
        for name in ("seed", "random_state"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        _check_n_imputations(self.n_imputations)

    def _resolve_n_neighbors(self) -> int:
        """``n_neighbors``, or the deprecated ``k`` when that was given."""
        n_neighbors = self.n_neighbors
        if self.k is not None:
            warnings.warn("FederatedIIM(k=...) is deprecated and will be removed; use "
                          "n_neighbors=... instead", FutureWarning, stacklevel=4)
            n_neighbors = self.k
        if not _is_int(n_neighbors) or n_neighbors < 1:
            name = "k" if self.k is not None else "n_neighbors"
            raise ValueError(f"{name} must be a positive int, got {n_neighbors!r}")
        return int(n_neighbors)

    def _bounds(self, sites: list[np.ndarray]) -> np.ndarray:
        """The public bounds, checked; with exact statistics, the data's range if unset."""
        n_features = sites[0].shape[1]
        if self.bounds is not None:
            bounds = np.asarray(self.bounds, dtype=np.float64)
            if self.encoding_ is not None and bounds.shape == (n_features, 2):
                bounds = self.encoding_.code_bounds(bounds)
            if bounds.shape != (n_features, 2) or np.any(bounds[:, 0] >= bounds[:, 1]):
                raise ValueError(f"bounds must be an (m, 2) array with lo < hi for m = "
                                 f"{n_features}, got shape {bounds.shape}")
            return bounds
        if np.isfinite(self.epsilon):
            raise ValueError("bounds are required for a private fit (epsilon < inf): they "
                             "must come from domain knowledge, not from the data")
        every_row = np.vstack(sites)
        low, high = np.nanmin(every_row, axis=0), np.nanmax(every_row, axis=0)
        return np.column_stack([low, np.where(high > low, high, low + 1.0)])

    def _fresh_ledgers(self) -> list[PrivacyLedger | None]:
        """One in-memory ledger per site holding this fit's budget (none when exact:
        epsilon = inf releases exact statistics, there is no budget to keep)."""
        if not np.isfinite(self.plan_.rho_total):
            return [None] * len(self.site_ids_)
        return [PrivacyLedger.in_memory(self.plan_.rho_total, site_id)
                for site_id in self.site_ids_]

    def _noise_sources(self, n_sites: int) -> list[SeededGaussianNoise | None]:
        """Per site, a seeded numpy noise source (``seed`` set) or None (OpenDP's)."""
        if self.seed is None:
            return [None] * n_sites
        return [SeededGaussianNoise(child)
                for child in np.random.SeedSequence(self.seed).spawn(n_sites)]

    # -- imputation ---------------------------------------------------------------------
    def transform(self, sites: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Impute every site's table from the bank (no further privacy cost); coded columns
        as their labels."""
        return [self._labels(result.values) for result in self.impute(sites)]

    def _labels(self, values: np.ndarray) -> np.ndarray:
        """A site's imputed ``values`` with every coded column's codes as its labels."""
        encoding = getattr(self, "encoding_", None)
        return values if encoding is None else encoding.labels(values)

    def impute(self, sites: Sequence[np.ndarray]) -> list[ImputationResult]:
        """Like :meth:`transform`, with per-cell provenance and uncertainty."""
        check_is_fitted(self, "bank_")
        encoding = getattr(self, "encoding_", None)
        results = []
        for table, site_id in zip(self._tables(sites), self.site_ids_, strict=True):
            encoded = table if encoding is None else encoding.encode(table)
            result = site_impute(encoded, self.bank_, self.bounds_, mode=self.mode,
                                 n_neighbors=self._n_neighbors, site_id=site_id,
                                 random_state=self.random_state)
            results.append(result if encoding is None else encoding.decode(result, table))
        return results

    def impute_multiple(self, sites: Sequence[np.ndarray]) -> list[list[ImputationResult]]:
        """``n_imputations`` draws of every site's completed table, as
        ``draws[imputation][site]`` (see :mod:`fediim.federated.multiple`)."""
        check_is_fitted(self, "bank_")
        _check_n_imputations(self.n_imputations)
        tables = self._tables(sites)
        streams = np.random.SeedSequence(self.random_state).spawn(len(tables))
        per_site = [site_draws(table, self.bank_, self.bounds_, int(self.n_imputations),
                               mode=self.mode, n_neighbors=self._n_neighbors,
                               site_id=site_id, random_state=self.random_state,
                               rng=np.random.default_rng(stream),
                               encoding=getattr(self, "encoding_", None))
                    for table, site_id, stream in zip(tables, self.site_ids_, streams,
                                                      strict=True)]
        return [list(draws) for draws in zip(*per_site, strict=True)]

    def multiple_imputations(self, sites: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Like :meth:`impute_multiple`, the completed tables only (coded columns as their
        labels): ``[imputation][site]``, M completed federations to analyse one by one and
        pool (:func:`fediim.mi.pool`)."""
        return [[self._labels(result.values) for result in federation]
                for federation in self.impute_multiple(sites)]

    def fit_transform(self, sites: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Fit on the sites and impute them."""
        return self.fit(sites).transform(sites)


def _check_n_imputations(value: object) -> None:
    if not (_is_int(value) and value >= 1):  # type: ignore[operator]
        raise ValueError(f"n_imputations must be an int >= 1, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _site_tables(sites: Sequence[Any]) -> list[np.ndarray]:
    """Each site's table as a float64 matrix; a bad one is a :class:`DataError` naming the
    site, row and column (inf, text, a ragged row, a column whose spread overflows)."""
    tables = []
    for number, table in enumerate(sites):
        try:
            tables.append(as_matrix(table)[0])
        except DataError as exc:
            raise exc.at(f"site {number}") from None
    return tables
