"""Multiple imputation of new rows from a site's verified bank (``fediim impute
--site-config ... --multiple M``).

The draws are those of in-process :func:`~fediim.federated.multiple.site_draws`, with the
site's *reference* rows (its table of the last run) as the evidence and the given rows as
the ones imputed, as :class:`~fediim.serve.engine.ServingEngine` imputes them:

1. the residual variance per column is measured once, on the reference rows' complete
   rows (each loses one attribute, in folds, imputed from the bank as released:
   :func:`~fediim.federated.multiple.site_residual_variance`);
2. each draw prepares an engine on the reference rows over the bank re-noised at the
   scale it was released with (a parametric bootstrap of the release, post-processing),
   imputes the rows, adds Gaussian noise of the residual variance, and draws each binary
   or categorical cell's level from its probabilities
   (:func:`~fediim.federated.multiple.renoised_draws`).

``local`` mode reads no bank: its draws are :class:`~fediim.impute.IIMImputer`'s, fitted
on the reference rows. Nothing here spends budget or writes the ledger.
"""

from __future__ import annotations

import numpy as np

from fediim.federated.bank import ModelBank
from fediim.federated.multiple import noised_columns, renoised_draws, site_residual_variance
from fediim.impute.encoding import MixedEncoding
from fediim.impute.estimator import IIMImputer
from fediim.io.result import METHOD_FALLBACK, METHOD_MEAN, ImputationResult
from fediim.serve.engine import EngineSettings, ServingEngine

__all__ = ["bank_draws", "bank_residual_variance"]


def bank_residual_variance(reference: np.ndarray, bank: ModelBank, bounds: np.ndarray,
                           settings: EngineSettings, rng: np.random.Generator,
                           encoding: MixedEncoding | None = None) -> np.ndarray:
    """Step 1 of the module doc: per engine column of ``reference`` (encoded with
    ``encoding``), the residual variance the draws add (0 for a column drawn as a level).
    It depends on the reference rows and the bank only: a service measures it once."""
    noised = noised_columns(encoding, reference.shape[1])
    return site_residual_variance(
        reference, bank, bounds, mode=settings.mode, n_neighbors=settings.n_neighbors,
        site_id=settings.site_id, random_state=settings.random_state, rng=rng,
        columns=np.flatnonzero(noised))


def bank_draws(reference: np.ndarray, x: np.ndarray, bank: ModelBank, bounds: np.ndarray,
               settings: EngineSettings, n_imputations: int, rng: np.random.Generator,
               encoding: MixedEncoding | None = None, variance: np.ndarray | None = None
               ) -> list[ImputationResult]:
    """``n_imputations`` draws of the completed ``x`` (see the module doc); every value
    inside the public ``bounds``, observed cells as they were. With ``encoding``,
    ``reference``, ``bank`` and ``bounds`` are over the encoded columns and ``x`` holds
    level codes, as do the draws (each a declared level). ``variance``: the residual
    variance measured before (:func:`bank_residual_variance`), else measured here."""
    if n_imputations < 1:
        raise ValueError(f"n_imputations must be >= 1, got {n_imputations}")
    if settings.mode == "local":
        if encoding is not None:
            raise ValueError("local mode draws from the site's own IIM: with coded columns "
                             "use fediim impute --multiple without --site-config")
        return _local_draws(reference, x, settings, n_imputations, rng)
    rows = x if encoding is None else encoding.encode(x)
    if variance is None:
        variance = bank_residual_variance(reference, bank, bounds, settings, rng, encoding)
    return renoised_draws(
        lambda renoised: ServingEngine(reference, renoised, bounds, settings).impute(rows),
        x, bank, bounds, variance, n_imputations, rng, encoding)


def _local_draws(reference: np.ndarray, x: np.ndarray, settings: EngineSettings,
                 n_imputations: int, rng: np.random.Generator) -> list[ImputationResult]:
    """``local`` mode: the site's own IIM's draws, fitted on the reference rows (a cell
    without a usable training row gets the site's mean, marked ``fallback``)."""
    imputer = IIMImputer(n_neighbors=settings.n_neighbors, n_imputations=n_imputations,
                         random_state=rng).fit(reference)
    draws = imputer.impute_multiple(x)
    for result in draws:
        result.method[result.method == METHOD_MEAN] = METHOD_FALLBACK
    return draws
