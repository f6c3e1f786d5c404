"""Private federated IIM: Gram statistics, private partitions, releases, the model bank,
site-side imputation and the in-process ``FederatedIIM`` estimator (no networking)."""

from typing import TYPE_CHECKING, Any

from fediim.federated.bank import BankConfig, ModelBank
from fediim.federated.plan import (
    MODES,
    PLAN_DEFAULTS,
    Mode,
    PlanParams,
    PrivacyPlan,
    plan_privacy,
    scale_to_bounds,
    unscale,
)
from fediim.federated.release import assemble_bank, site_release

if TYPE_CHECKING:
    from fediim.federated.estimator import FederatedIIM
    from fediim.federated.site_imputation import site_impute

__all__ = [
    "BankConfig",
    "FederatedIIM",
    "ModelBank",
    "MODES",
    "Mode",
    "PLAN_DEFAULTS",
    "PlanParams",
    "PrivacyPlan",
    "assemble_bank",
    "plan_privacy",
    "scale_to_bounds",
    "site_impute",
    "site_release",
    "unscale",
]


def __getattr__(name: str) -> Any:
    """The estimator and site imputation, imported on first use: they load scikit-learn,
    which a Flower ClientApp's release and secure-sum rounds never need."""
    if name == "FederatedIIM":
        from fediim.federated.estimator import FederatedIIM

        return FederatedIIM
    if name == "site_impute":
        from fediim.federated.site_imputation import site_impute

        return site_impute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
