"""The shared ValidationError formatter and finite-float check (fediim.io.validation)."""

from __future__ import annotations

import math

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fediim.io.validation import (
    FiniteFloat,
    error_lines,
    finite,
    format_validation_error,
    join_errors,
)


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate: FiniteFloat = Field(gt=0)
    names: list[str] = Field(default_factory=list)


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_name: str
    inner: _Inner
    blob: bytes = b""
    bounds: dict[str, float] = Field(default_factory=dict)

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if x < 0:
                raise ValueError(f"{k}: expected >= 0, got {x}")
        return v


def _error(data: dict) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate(data)
    return info.value


def test_finite() -> None:
    assert finite(1.5) == 1.5
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="must be finite"):
            finite(bad)


def test_lines_name_location_message_and_input() -> None:
    exc = _error({"inner": {"rate": math.inf, "names": ["a", 3], "extra": 1}, "blob": 5,
                  "bounds": {"age": -1.0}})
    lines = error_lines(exc, allowed_keys=["rate", "names"])
    assert lines == [
        "run_name: required key is missing",
        "inner.rate: must be finite (got inf)",
        "inner.names[1]: expected a valid string (got 3)",
        "inner.extra: unknown key; expected only: rate, names",
        "blob: expected a valid bytes (got 5)",
        "bounds.age: expected >= 0, got -1.0",  # sub-key folded; says "got" itself
    ]


def test_options() -> None:
    exc = _error({"run_name": "r", "inner": {"rate": 0}, "blob": "x" * 500})
    assert error_lines(exc, prefix="cfg", rename=lambda k: k.replace("_", "-"),
                       show_input=False) == [
        "cfg.inner.rate: expected greater than 0",
    ]
    exc = _error({"run_name": 1, "inner": {"rate": 1}})
    (line,) = error_lines(exc, describe=lambda err: "a name" if err["type"] == "string_type"
                          else None)
    assert line == "run_name: a name (got 1)"
    exc = _error({"run_name": "r", "inner": {"rate": 1}, "bounds": "x" * 500})
    (line,) = error_lines(exc)
    assert line.endswith("...)") and len(line) < 200  # long inputs are cut


def test_whole_message() -> None:
    assert join_errors("f.toml", ["a: x"]) == "f.toml: a: x"
    assert join_errors("f.toml", ["a: x", "b: y"]) == "f.toml: 2 errors:\n  a: x\n  b: y"
    assert join_errors("m", ["a: x", "b: y"], noun="problems", multiline=False) == \
        "m: 2 problems: a: x; b: y"
    exc = _error({"run_name": "r", "inner": {"rate": math.nan}})
    assert format_validation_error(exc, "site.toml") == \
        "site.toml: inner.rate: expected greater than 0 (got nan)"
    with pytest.raises(ValidationError) as info:
        _Outer.model_validate([1])
    assert format_validation_error(info.value, "s") == \
        "s: <top level>: expected a valid dictionary or instance of _Outer (got [1])"


def test_models_reject_infinite_budgets() -> None:
    from coordinator.config import ConfigError, CoordinatorConfig
    from fediim.protocol.messages import RUN_CONFIG_DEFAULTS, HandshakeRequest
    from fediim.protocol.site_config import Budget

    with pytest.raises(ValidationError, match="must be finite"):
        Budget(epsilon=math.inf, delta=1e-6)
    with pytest.raises(ValidationError, match="must be finite"):
        HandshakeRequest(schema_hash="0" * 64, coordinator_key_id="k", epsilon=1.0,
                         delta=1e-6, cell_noise_ratio=math.inf)
    with pytest.raises(ConfigError, match=r"cell-noise-ratio: must be finite \(got inf\)"):
        CoordinatorConfig.from_run_config({**RUN_CONFIG_DEFAULTS, "schema": "s",
                                           "signing-key": "k", "out-dir": "o",
                                           "cell-noise-ratio": math.inf})
