"""The centralized IIM engine: neighbour search, individual models, the sklearn estimator."""

from typing import TYPE_CHECKING, Any

from fediim.io.result import METHOD_IIM, METHOD_MEAN, ImputationResult

if TYPE_CHECKING:
    from fediim.impute.estimator import IIMImputer, glr_imputer, knn_imputer

__all__ = ["METHOD_IIM", "METHOD_MEAN", "IIMImputer", "ImputationResult", "glr_imputer",
           "knn_imputer"]


def __getattr__(name: str) -> Any:
    """The estimator, imported on first use (scikit-learn is slow to import, and the
    federated layer needs only the engine's numerics)."""
    if name in ("IIMImputer", "glr_imputer", "knn_imputer"):
        from fediim.impute import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
