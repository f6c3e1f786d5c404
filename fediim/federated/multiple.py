"""Multiple imputation from the federation's bank: draws that carry the release's noise.

A site's single imputation from a noised bank treats the bank's Gram matrices as if they
were exact. Each of the M draws here instead:

1. re-noises the bank (:func:`renoised_bank`): every cell's Gram gets fresh Gaussian
   noise of the scale it was released with, in the cell's own coordinates where the
   release drew its noise, then the same PSD projection. The spread of the models read
   off these banks around the released ones mimics the spread of the released ones
   around the exact statistics (a parametric bootstrap of the release). It reads only
   the released bank and its public noise scale: post-processing, no privacy cost.
2. imputes the site's rows from that bank exactly as a single imputation would
   (:func:`~fediim.federated.site_impute`, same mode and choices);
3. adds Gaussian noise of the residual variance per column, which the site measures on
   its own complete rows (:func:`site_residual_variance`: each loses one attribute, in
   folds, and is imputed from the released bank).

With coded columns (``encoding``: the table holds level codes, the bank is over its
encoded columns), step 3 adds the residual noise to the numeric and ordinal columns only;
every binary or categorical cell instead draws its level from the distribution that the
re-noised bank's voted scores give it (:meth:`~fediim.impute.encoding.MixedEncoding.decode`
with :func:`~fediim.impute.encoding.draw_levels`), and an ordinal rank is rounded to its
nearest level: every drawn coded cell is a declared level.

``local`` mode reads no bank: its draws are :class:`~fediim.impute.IIMImputer`'s
(:mod:`fediim.impute.multiple`). The site's data never leave it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np

from fediim.federated.bank import ModelBank
from fediim.federated.gram import (
    affine_map,
    from_upper_triangle,
    project_psd,
    transform_gram,
)
from fediim.federated.plan import Mode
from fediim.federated.site_imputation import site_impute
from fediim.impute.encoding import MixedEncoding, draw_levels
from fediim.impute.estimator import IIMImputer
from fediim.io.result import ImputationResult

__all__ = ["add_residual_noise", "noised_columns", "renoised_bank", "renoised_draws",
           "site_draws", "site_residual_variance"]

#: Folds in which a site's complete rows each lose one attribute to measure the residual
#: variance of its imputations.
RESIDUAL_FOLDS = 5


def renoised_bank(bank: ModelBank, rng: np.random.Generator) -> ModelBank:
    """The bank with fresh release noise added to every cell (see the module doc); the
    bank itself when its statistics are exact."""
    if bank.n_cells == 0 or not np.any(bank.sigma > 0):
        return bank
    size = bank.n_features + 1
    to_cell = affine_map(0.5 * (bank.lo + bank.hi), bank.hi - bank.lo)
    frame = bank.frame
    if frame is not None:  # the boxes are in the principal-axis frame
        to_cell = to_cell @ frame.augmented()
    cell_grams = transform_gram(bank.gram, to_cell)
    rows, columns = np.triu_indices(size)
    noise = rng.standard_normal((bank.n_cells, len(rows))) * bank.sigma[:, None]
    noised = project_psd(cell_grams + from_upper_triangle(noise, size))
    gram = transform_gram(noised, np.linalg.inv(to_cell))
    # A re-noised count can fall below the bank's floor: such a cell is noise only.
    gram[:, 0, 0] = np.maximum(gram[:, 0, 0], 1e-9)
    renoised = copy.copy(bank)
    renoised.gram, renoised.min_records = gram, 0
    return renoised


def site_residual_variance(x: np.ndarray, bank: ModelBank, bounds: np.ndarray, *,
                           mode: Mode, n_neighbors: int, site_id: str | None,
                           random_state: int | None, rng: np.random.Generator,
                           columns: np.ndarray | None = None) -> np.ndarray:
    """Per column, the mean squared error of the site's imputation of its own complete
    rows: each loses one attribute (``columns``, default all, dealt in turn), in
    :data:`RESIDUAL_FOLDS` folds, and is imputed from ``bank``. A column no fold hid gets
    the mean of the others (0 when none)."""
    complete = np.flatnonzero(~np.isnan(x).any(axis=1))
    squared = np.zeros(x.shape[1])
    counts = np.zeros(x.shape[1])
    candidates = np.arange(x.shape[1]) if columns is None else np.asarray(columns, np.intp)
    if candidates.size == 0:
        return squared
    hidden = candidates[rng.permutation(len(complete)) % len(candidates)]
    folds = rng.permutation(len(complete)) % RESIDUAL_FOLDS
    for fold in range(min(RESIDUAL_FOLDS, len(complete))):
        rows, columns = complete[folds == fold], hidden[folds == fold]
        masked = x.copy()
        masked[rows, columns] = np.nan
        found = site_impute(masked, bank, bounds, mode=mode, n_neighbors=n_neighbors,
                            site_id=site_id, random_state=random_state)
        errors = found.values[rows, columns] - x[rows, columns]
        np.add.at(squared, columns, errors**2)
        np.add.at(counts, columns, 1)
    with np.errstate(invalid="ignore"):
        variance = squared / counts
    fallback = float(np.mean(variance[counts > 0])) if np.any(counts > 0) else 0.0
    return np.where(counts > 0, variance, fallback)


def site_draws(x: np.ndarray, bank: ModelBank, bounds: np.ndarray, n_imputations: int, *,
               mode: Mode, n_neighbors: int, site_id: str | None, random_state: int | None,
               rng: np.random.Generator, encoding: MixedEncoding | None = None
               ) -> list[ImputationResult]:
    """``n_imputations`` draws of one site's completed table (see the module doc); every
    value clipped into the public bounds, observed cells as they were. With ``encoding``,
    ``x`` holds level codes, ``bank`` and ``bounds`` are over the encoded columns, and the
    draws hold codes (each a declared level)."""
    if mode == "local":
        imputer = IIMImputer(n_neighbors=n_neighbors, n_imputations=n_imputations,
                             random_state=rng, column_kinds=(
                                 None if encoding is None else encoding.code_kinds()))
        return imputer.fit(x).impute_multiple(x)
    settings = {"mode": mode, "n_neighbors": n_neighbors, "site_id": site_id,
                "random_state": random_state}
    engine = x if encoding is None else encoding.encode(x)
    noised = noised_columns(encoding, engine.shape[1])
    variance = site_residual_variance(engine, bank, bounds, rng=rng,
                                      columns=np.flatnonzero(noised), **settings)
    return renoised_draws(lambda renoised: site_impute(engine, renoised, bounds, **settings),
                          x, bank, bounds, variance, n_imputations, rng, encoding)


def noised_columns(encoding: MixedEncoding | None, width: int) -> np.ndarray:
    """Which of the ``width`` engine columns get residual noise in a draw: the numeric and
    ordinal ones (a binary or categorical cell draws its level instead)."""
    if encoding is None:
        return np.ones(width, dtype=bool)
    return np.isin(encoding.encoded_kinds(), ("numeric", "ordinal"))


def renoised_draws(impute_with: Callable[[ModelBank], ImputationResult], x: np.ndarray,
                   bank: ModelBank, bounds: np.ndarray, variance: np.ndarray,
                   n_imputations: int, rng: np.random.Generator,
                   encoding: MixedEncoding | None = None) -> list[ImputationResult]:
    """Steps 2 and 3 of the module doc, ``n_imputations`` times: ``impute_with`` a freshly
    re-noised ``bank``, residual noise of ``variance`` on the noised columns, and with
    ``encoding`` each binary or categorical cell's level drawn (``x``: the level codes)."""
    noised = noised_columns(encoding, len(variance))
    draws = []
    for _ in range(n_imputations):
        result = impute_with(renoised_bank(bank, rng))
        add_residual_noise(result, variance, bounds, rng, noised)
        if encoding is not None:
            result = encoding.decode(result, x, lambda probabilities: draw_levels(
                probabilities, rng))
        draws.append(result)
    return draws


def add_residual_noise(result: ImputationResult, variance: np.ndarray, bounds: np.ndarray,
                       rng: np.random.Generator, noised: np.ndarray) -> None:
    """Every imputed cell of the ``noised`` columns plus Gaussian noise of its column's
    residual variance, clipped into the public bounds."""
    rows, columns = np.nonzero(result.imputed & noised)
    noise = rng.standard_normal(len(rows)) * np.sqrt(variance[columns])
    result.values[rows, columns] = np.clip(result.values[rows, columns] + noise,
                                           bounds[columns, 0], bounds[columns, 1])
