"""The result of one imputation: the completed matrix and what was done to each cell.

Produced by the engines (:mod:`fediim.impute`, :mod:`fediim.federated`), written by
:mod:`fediim.io.outputs` and :mod:`fediim.io.audit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["METHOD_BANK", "METHOD_FALLBACK", "METHOD_HYBRID", "METHOD_IIM", "METHOD_MEAN",
           "ImputationResult"]

#: Method codes recorded per imputed cell.
METHOD_IIM = "iim"
METHOD_MEAN = "mean"
#: The bank's models failed numerically for this cell; the site's own IIM filled it (in
#: ``fediim serve`` and ``fediim impute --site-config``: the site's mean, else the bank's).
METHOD_FALLBACK = "fallback"
#: Served imputations (:mod:`fediim.serve`): the hybrid blend, or the bank's models alone.
METHOD_HYBRID = "hybrid"
METHOD_BANK = "bank"


@dataclass
class ImputationResult:
    """Imputed matrix plus per-cell provenance.

    values : (n, m) imputed matrix (observed cells copied exactly).
    imputed : (n, m) bool, True where a value was filled in.
    uncertainty : (n, m) weighted spread of the voting candidates (NaN where not imputed;
        0 for a mean fallback, which has no candidates). In a binary or categorical column
        it is ``1 - probability``; in an ordinal one the spread in ranks (see
        :mod:`fediim.impute.encoding`).
    method : (n, m) object array: "iim", "mean" (no usable training row), "fallback" (the
        federation's models failed; the site's own IIM filled the cell), or "" (observed).
    ell : (n, m) mean chosen ell over the neighbours' models (0 where the global model).
    n_candidates : (n, m) int, number of candidates combined.
    probability : (n, m) the imputed level's voted probability in a binary or categorical
        column (NaN elsewhere), or None when the table has no such column.
    """

    values: np.ndarray
    imputed: np.ndarray
    uncertainty: np.ndarray
    method: np.ndarray
    ell: np.ndarray
    n_candidates: np.ndarray
    probability: np.ndarray | None = field(default=None)

