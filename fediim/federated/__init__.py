"""Private federated IIM: Gram statistics, private partitions, releases, the model bank,
site-side imputation and the in-process ``FederatedIIM`` estimator (no networking)."""

from fediim.federated.bank import BankConfig, ModelBank
from fediim.federated.estimator import FederatedIIM
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
