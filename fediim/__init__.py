"""fediim: privacy-preserving federated imputation with IIM (Imputation via Individual Models).

``IIMImputer`` is the centralized, scikit-learn-compatible engine.
"""

from fediim.imputer import IIMImputer, ImputationResult, glr_imputer, knn_imputer

__all__ = ["IIMImputer", "ImputationResult", "glr_imputer", "knn_imputer"]
__version__ = "0.1.0"
