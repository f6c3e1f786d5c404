"""The federation's run configuration, declared once: every key, its default and its bounds.

Flower hands both apps one flat run configuration: ``[tool.flwr.app.config]`` in
``pyproject.toml``, overridable with ``flwr run --run-config``; every key that may be
overridden must be declared there. :class:`RunConfig` is the single declaration.
:data:`RUN_CONFIG_DEFAULTS` (kebab-case keys, as Flower sees them), the app ``pyproject.toml``
that ``fediim local-deploy`` writes and the coordinator's validated configuration derive from
it; Flower reads the repository's ``pyproject.toml`` statically, so a test checks that its
section equals :data:`RUN_CONFIG_DEFAULTS`.

The privacy plan's parameters are :class:`PlanFields`, shared by the run configuration and the
handshake/release requests, with the defaults of :data:`fediim.federated.plan.PLAN_DEFAULTS`.
Paths are on the coordinator machine; ``seed`` >= 0 is for simulations only (whoever knows the
seed can subtract the noise, so a site refuses it unless its own configuration allows it).

This module loads neither flwr nor cryptography: the command line reads its defaults.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fediim.federated.plan import PLAN_DEFAULTS, Mode, PlanParams, PrivacyPlan, plan_privacy
from fediim.io.validation import FiniteFloat

__all__ = ["NOISY_MAX_DEPTH", "RUN_CONFIG_DEFAULTS", "Delta", "Epsilon", "PlanFields", "RunConfig",
           "privacy_plan", "run_config_key"]

#: A finite epsilon > 0: a federated run always spends a finite budget.
Epsilon = Annotated[FiniteFloat, Field(gt=0)]
#: The delta of an (epsilon, delta) guarantee.
Delta = Annotated[float, Field(gt=0, lt=1)]

#: The partition's depth cap that :func:`~fediim.federated.plan.plan_privacy` picks under
#: noise (``max_depth=None``). A Flower run is always noisy, and a run-config value cannot be
#: None, so the run states the depth explicitly (a test checks the two agree).
NOISY_MAX_DEPTH = 16


def run_config_key(field_name: str) -> str:
    """The run-config key of a field: kebab-case (``min_sites`` -> ``min-sites``), except
    ``schema_path``, whose key is ``schema``."""
    return "schema" if field_name == "schema_path" else field_name.replace("_", "-")


def privacy_plan(epsilon: float, delta: float, n_features: int,
                 params: PlanParams) -> PrivacyPlan:
    """:func:`~fediim.federated.plan.plan_privacy` for one :class:`PlanParams` object."""
    return plan_privacy(epsilon, delta, n_features, **asdict(params))


class PlanFields(BaseModel):
    """The privacy plan's public parameters as validated fields (how a spend is used, never
    how much is spent); defaults from :data:`~fediim.federated.plan.PLAN_DEFAULTS`."""

    min_records: int = Field(default=PLAN_DEFAULTS.min_records, ge=1)
    count_fraction: float = Field(default=PLAN_DEFAULTS.count_fraction, gt=0, lt=1)
    clip_fraction: float = Field(default=PLAN_DEFAULTS.clip_fraction, ge=0, lt=0.5)
    max_depth: int = Field(default=NOISY_MAX_DEPTH, ge=0, le=64)
    cell_noise_ratio: FiniteFloat = Field(default=PLAN_DEFAULTS.cell_noise_ratio, gt=0)
    # Secure sums: cut the shared partition along the federation's principal axes (the
    # clipping budget pays for the summed moments; fediim.federated.principal).
    principal_axes: bool = PLAN_DEFAULTS.principal_axes

    def plan_params(self) -> PlanParams:
        """These fields as the plan's parameters (``n_trees`` by budget: one under noise)."""
        return PlanParams(min_records=self.min_records, count_fraction=self.count_fraction,
                          clip_fraction=self.clip_fraction,
                          max_depth=self.max_depth, cell_noise_ratio=self.cell_noise_ratio,
                          n_trees=PLAN_DEFAULTS.n_trees, principal_axes=self.principal_axes)

    def plan_fields(self) -> dict[str, Any]:
        """These fields by name, e.g. to copy them into a request or a report."""
        return {name: getattr(self, name) for name in PlanFields.model_fields}


class RunConfig(PlanFields):
    """Every key of the federation's run configuration, with its default and its bounds."""

    model_config = ConfigDict(alias_generator=run_config_key, populate_by_name=True,
                              frozen=True, extra="forbid")

    schema_path: str = ""  # the federation's schema TOML (its hash is checked by every site)
    signing_key: str = ""  # the coordinator's Ed25519 private key (PEM)
    out_dir: str = ""  # federation.json (ledger view), bank.npz, bank.sig.json
    # site id -> registered public key (fediim.protocol.identity); "": site ids unverified
    site_registry: str = ""
    min_sites: int = Field(default=2, ge=1)  # quorum, checked after every stage
    expected_sites: int = Field(default=0, ge=0)  # SuperNodes to wait for (0: min-sites)
    epsilon: Epsilon = 1.0  # this fit's spend at every site
    delta: Delta = 1e-6
    # The federation's budget policy: no site may have spent more than this epsilon (at
    # delta) in total, across runs, once this run is charged; 0: no federation policy (each
    # site's own budget and per-run cap still hold). Checked at the handshake from the
    # site's reported spend and this coordinator's last receipt.
    max_total_epsilon: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    mode: Mode = "hybrid"  # how the sites impute (fediim.federated.plan.MODES)
    k: int = Field(default=10, ge=1)  # neighbours
    seed: int = Field(default=-1, ge=-1)  # -1: OpenDP noise; >= 0: seeded, SIMULATION ONLY
    node_wait_timeout: float = Field(default=60.0, gt=0)  # seconds
    handshake_timeout: float = Field(default=60.0, gt=0)
    release_timeout: float = Field(default=300.0, gt=0)
    impute_timeout: float = Field(default=300.0, gt=0)
    # How the sites combine their statistics (fediim.federated.secure_release): "secure"
    # sums every statistic over sites (the coordinator sees sums only), "per-site" releases
    # each site's cells, "auto" is secure from 3 admitted sites on.
    aggregation: Literal["auto", "secure", "per-site"] = "auto"
    # Secure sums: the sites whose noise every sum must hold (Shamir threshold t); 0: two
    # thirds of the admitted sites (at least 2). Refused at the handshake if above them.
    secure_threshold: int = Field(default=0, ge=0)
    # Seconds for the secure key rounds (advertise keys, share keys); the sums' rounds
    # take release-timeout.
    key_timeout: float = Field(default=60.0, gt=0)
    # Simulation Engine only: a JSON list of site TOMLs, picked by each simulated node's
    # partition-id. Deployed SuperNodes name their own TOML in --node-config and ignore it.
    site_configs: str = ""

    @field_validator("secure_threshold")
    @classmethod
    def _threshold(cls, value: int) -> int:
        if value == 1:
            raise ValueError("a threshold of 1 would let one share reveal a site's masks; "
                             "use 0 (two thirds) or at least 2")
        return value

    @property
    def wanted_sites(self) -> int:
        """How many SuperNodes to wait for before the handshake."""
        return max(self.min_sites, self.expected_sites)


#: The run configuration's defaults under Flower's (kebab-case) keys.
RUN_CONFIG_DEFAULTS: dict[str, Any] = RunConfig().model_dump(by_alias=True)
