"""fediim: privacy-preserving federated imputation with IIM (Imputation via Individual Models).

``IIMImputer`` is the centralized, scikit-learn-compatible engine; ``FederatedIIM`` runs
private federated IIM in one process (each array one site). Importing :mod:`fediim` loads
neither Flower nor ``cryptography``: those live in :mod:`fediim.protocol` and above.
"""

from typing import TYPE_CHECKING, Any

from fediim._version import __version__

if TYPE_CHECKING:
    from fediim.federated.estimator import FederatedIIM
    from fediim.impute.estimator import IIMImputer, glr_imputer, knn_imputer
    from fediim.io.result import ImputationResult

__all__ = ["FederatedIIM", "IIMImputer", "ImputationResult", "glr_imputer", "knn_imputer",
           "__version__"]


def __getattr__(name: str) -> Any:
    """The estimators, imported on first use: importing any ``fediim`` submodule then costs
    no scikit-learn, which matters to a Flower ClientApp (one new process per message)."""
    if name == "FederatedIIM":
        from fediim.federated.estimator import FederatedIIM

        return FederatedIIM
    if name in ("IIMImputer", "glr_imputer", "knn_imputer"):
        from fediim.impute import estimator

        return getattr(estimator, name)
    if name == "ImputationResult":
        from fediim.io.result import ImputationResult

        return ImputationResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
