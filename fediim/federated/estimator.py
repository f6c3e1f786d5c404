"""``FederatedIIM``: private federated IIM in one process, each array one site."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fediim.federated.plan import (
    Mode,
    plan_privacy,
)
from fediim.federated.release import assemble_bank, site_release
from fediim.federated.site_imputation import site_impute
from fediim.impute.estimator import ImputationResult
from fediim.privacy import (
    PrivacyLedger,
    SeededGaussianNoise,
)


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
