"""fediim: privacy-preserving federated imputation with IIM (Imputation via Individual Models).

``IIMImputer`` is the centralized, scikit-learn-compatible engine; ``FederatedIIM`` runs
private federated IIM in one process (each array one site). Importing :mod:`fediim` loads
neither Flower nor ``cryptography``: those live in :mod:`fediim.protocol` and above.
"""

from fediim._version import __version__
from fediim.federated.estimator import FederatedIIM
from fediim.impute import IIMImputer, ImputationResult, glr_imputer, knn_imputer

__all__ = ["FederatedIIM", "IIMImputer", "ImputationResult", "glr_imputer", "knn_imputer",
           "__version__"]
