"""The centralized IIM engine: neighbour search, individual models, the sklearn estimator."""

from fediim.impute.estimator import IIMImputer, glr_imputer, knn_imputer
from fediim.io.result import METHOD_IIM, METHOD_MEAN, ImputationResult

__all__ = ["METHOD_IIM", "METHOD_MEAN", "IIMImputer", "ImputationResult", "glr_imputer",
           "knn_imputer"]
