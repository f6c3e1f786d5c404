"""The coordinator's run configuration (``[tool.flwr.app.config]``, overridable with
``flwr run --run-config``). Keys are kebab-case in TOML, snake_case here.

Run configuration travels to every node of the run, so it holds *paths* on the coordinator
machine (schema, signing key, output directory), never secrets themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fediim.errors import ConfigError
from fediim.io.validation import FiniteFloat, format_validation_error
from fediim.protocol.messages import RUN_CONFIG_DEFAULTS

_D = RUN_CONFIG_DEFAULTS

__all__ = ["RUN_CONFIG_DEFAULTS", "CoordinatorConfig", "ConfigError"]


class CoordinatorConfig(BaseModel):
    """Validated run configuration of the ServerApp."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_path: Path = Field(alias="schema")
    signing_key: Path
    out_dir: Path
    min_sites: int = Field(default=_D["min-sites"], ge=1)
    expected_sites: int = Field(default=_D["expected-sites"], ge=0)
    epsilon: FiniteFloat = Field(default=_D["epsilon"], gt=0)
    delta: float = Field(default=_D["delta"], gt=0, lt=1)
    min_records: int = Field(default=_D["min-records"], ge=1)
    count_fraction: float = Field(default=_D["count-fraction"], gt=0, lt=1)
    max_depth: int = Field(default=_D["max-depth"], ge=0, le=64)
    cell_noise_ratio: FiniteFloat = Field(default=_D["cell-noise-ratio"], gt=0)
    mode: Literal["hybrid", "federated", "local", "mean"] = _D["mode"]
    k: int = Field(default=_D["k"], ge=1)
    seed: int = Field(default=_D["seed"], ge=-1)
    node_wait_timeout: float = Field(default=_D["node-wait-timeout"], gt=0)
    handshake_timeout: float = Field(default=_D["handshake-timeout"], gt=0)
    release_timeout: float = Field(default=_D["release-timeout"], gt=0)
    impute_timeout: float = Field(default=_D["impute-timeout"], gt=0)

    @field_validator("schema_path", "signing_key", "out_dir", mode="before")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must name a path on the coordinator machine")
        return v

    @property
    def wanted_sites(self) -> int:
        """How many SuperNodes to wait for before the handshake."""
        return max(self.min_sites, self.expected_sites)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> CoordinatorConfig:
        """From Flower's run config (kebab-case keys)."""
        raw = {str(k).replace("-", "_"): v for k, v in run_config.items()}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(
                exc, "invalid run configuration", multiline=False,
                rename=lambda key: key.replace("_", "-"))) from None
