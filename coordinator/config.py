"""The coordinator's run configuration: :class:`~fediim.protocol.run_config.RunConfig` (every
key, default and bound, declared once) with the coordinator's three paths required.

Run configuration travels to every node of the run, so it holds *paths* on the coordinator
machine (schema, signing key, output directory), never secrets themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError, field_validator

from fediim.errors import ConfigError
from fediim.io.validation import format_validation_error
from fediim.protocol.run_config import RunConfig

__all__ = ["ConfigError", "CoordinatorConfig"]


class CoordinatorConfig(RunConfig):
    """Validated run configuration of the ServerApp (keys as in ``[tool.flwr.app.config]``)."""

    # A key this coordinator does not know is ignored rather than fatal.
    model_config = ConfigDict(extra="ignore")

    schema_path: Path
    signing_key: Path
    out_dir: Path

    @field_validator("schema_path", "signing_key", "out_dir", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a path on the coordinator machine")
        return value

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> CoordinatorConfig:
        """From Flower's run config (kebab-case keys); :class:`ConfigError` names the key."""
        try:
            return cls.model_validate(run_config)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(
                exc, "invalid run configuration", multiline=False)) from None
