"""Global tree ensembles that a pattern may stack with IIM, cross-fitted for validation.

IIM's individual models are local planes (or quadratics) voted among neighbours; where a
target depends on its features through thresholds or many interactions a global tree
ensemble can predict it better, and where it does not, IIM wins. So a pattern with at
least :data:`MIN_TREE_ROWS` training rows also fits two of scikit-learn's ensembles on its
training rows, gradient-boosted trees (``HistGradientBoostingRegressor``) and extremely
randomized trees (``ExtraTreesRegressor``), and :mod:`fediim.impute.pattern_choice` weighs
them against IIM, the global model and the mean on held-out predictions of the same rows.

Cross-fitting: the validation rows are dealt into :data:`TREE_FOLDS` folds; fold f's
ensembles learn every training row except fold f's validation rows and predict those, so
each validation row is predicted by ensembles that never saw it. The imputation then
averages the folds' ensembles (for extremely randomized trees, a forest of
``TREE_FOLDS x`` :data:`TREES_PER_FOLD` trees; for boosting, bagged boosted models), so no
refit on all rows is needed: the cross-fit is the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MIN_TREE_ROWS", "TREE_FOLDS", "TREES_PER_FOLD", "TreeStack", "fit_tree_stack"]

#: Patterns with fewer training rows do not offer tree ensembles.
MIN_TREE_ROWS = 100
#: Cross-fitting folds over the validation rows.
TREE_FOLDS = 3
#: Extremely randomized trees per fold (the imputing forest has TREE_FOLDS times as many).
TREES_PER_FOLD = 16
#: The ensembles' seed: imputation uses no randomness the caller does not fix.
TREE_SEED = 0


def _ensembles() -> list[Any]:
    """Unfitted (boosted trees, extremely randomized trees), single-threaded forests.
    scikit-learn's ensembles are imported here, on first use: the federated layer loads
    the engine's numerics and should not pay their import."""
    from sklearn.ensemble import ExtraTreesRegressor, HistGradientBoostingRegressor

    return [HistGradientBoostingRegressor(random_state=TREE_SEED, early_stopping=False),
            ExtraTreesRegressor(n_estimators=TREES_PER_FOLD, random_state=TREE_SEED,
                                n_jobs=1)]


@dataclass
class TreeStack:
    """Cross-fitted tree ensembles of one pattern.

    folds : per fold, the fitted (boosted, randomized) ensembles.
    held_out : (2, validation rows), each validation row's prediction by the folds'
        ensembles that did not learn it, in the order of the validation rows given to
        :func:`fit_tree_stack`.
    """

    folds: list[list[Any]]
    held_out: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Each ensemble's prediction of rows ``features`` (q, f), averaged over the
        folds: shape (2, q)."""
        if not len(features):
            return np.zeros((2, 0))
        return np.mean([[model.predict(features) for model in fold] for fold in self.folds],
                       axis=0)


def fit_tree_stack(features: np.ndarray, target: np.ndarray, rows: np.ndarray) -> TreeStack:
    """Fit the cross-fitted ensembles of a pattern's training rows (``features`` (n, f),
    ``target`` (n,)), the validation ``rows`` dealt into folds in turn."""
    rows = np.asarray(rows, dtype=np.intp)
    held_out = np.zeros((2, len(rows)))
    folds = []
    for fold in range(min(TREE_FOLDS, len(rows))):
        out = np.arange(fold, len(rows), TREE_FOLDS)
        learn = np.ones(len(target), dtype=bool)
        learn[rows[out]] = False
        models = [model.fit(features[learn], target[learn]) for model in _ensembles()]
        held_out[:, out] = [model.predict(features[rows[out]]) for model in models]
        folds.append(models)
    return TreeStack(folds, held_out)
