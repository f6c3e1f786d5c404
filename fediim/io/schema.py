"""Table schema: column order, public bounds, missing markers, which columns to impute.

Bounds are *public* domain knowledge (e.g. age 0-120): every private release is scaled
into them, so they must not be read from the data (DESIGN §3). The schema is kept in a
small TOML file::

    missing = ["", "NA", "?"]          # optional global missing markers
    [columns."age"]
    bounds = [0, 120]
    missing = ["-1"]                   # optional extra markers for this column
    impute = true                      # optional, default true
    [columns."chest_pain"]
    kind = "categorical"               # numeric (default), binary, categorical, ordinal
    levels = [1, 2, 3, 4]              # the declared labels (numbers or strings)

A coded column (``binary``: exactly two levels; ``categorical``: unordered levels;
``ordinal``: levels in their order) declares its ``levels``, public like bounds; a cell
holding any other label is an error. Its codes are the level positions 0, 1, ...

Column order is the order of the ``[columns."..."]`` tables in the file. Any problem is
reported as a :class:`SchemaError` naming the file, the offending key and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from fediim.errors import SchemaError
from fediim.io.toml import read_toml, toml_document, toml_string
from fediim.io.validation import error_lines, join_errors

__all__ = [
    "CODED_KINDS",
    "DEFAULT_MISSING",
    "KINDS",
    "ColumnSpec",
    "Kind",
    "Level",
    "SchemaError",
    "TableSchema",
    "infer_schema",
    "load_schema",
    "propose_kinds",
]

DEFAULT_MISSING: tuple[str, ...] = ("", "NA", "NaN", "nan", "?")
"""Global missing markers used when a schema (or caller) declares none."""

_SCHEMA_FORMAT_VERSION = 1
_TOML_HEADER = "fediim table schema: bounds are public domain knowledge, not read from data"
_MARKERS: TypeAdapter[list[str]] = TypeAdapter(list[StrictStr])
_TOP_KEYS = ("missing", "columns")

Kind = Literal["numeric", "binary", "categorical", "ordinal"]
#: Every column kind, and the coded ones (declared levels; cells are labels).
KINDS: tuple[str, ...] = ("numeric", "binary", "categorical", "ordinal")
CODED_KINDS: tuple[str, ...] = ("binary", "categorical", "ordinal")
#: A declared level: a number or a string label.
Level = StrictStr | StrictFloat


class ColumnSpec(BaseModel):
    """One column: its name, kind, public bounds or declared levels, extra missing
    markers, whether imputed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(min_length=1)
    kind: Kind = "numeric"
    bounds: tuple[StrictFloat, StrictFloat] | None = None
    levels: tuple[Level, ...] | None = None
    missing: list[StrictStr] = Field(default_factory=list)
    impute: StrictBool = True

    @property
    def coded(self) -> bool:
        """Whether the column holds labels of declared levels (binary/categorical/ordinal)."""
        return self.kind in CODED_KINDS

    @field_validator("levels", mode="before")
    @classmethod
    def _check_levels(cls, v: Any) -> tuple[Any, ...] | None:
        if v is None:
            return v
        if isinstance(v, str) or not isinstance(v, Sequence):
            raise ValueError(f"expected levels = [...], a list of labels, got {v!r}")
        levels = tuple(_level(level) for level in v)
        if len(set(map(_level_key, levels))) != len(levels):
            raise ValueError(f"expected distinct levels, got {list(v)}")
        return levels

    @model_validator(mode="after")
    def _levels_fit_kind(self) -> ColumnSpec:
        if not self.coded:
            if self.levels is not None:
                raise ValueError("levels are declared only for kind = \"binary\", "
                                 "\"categorical\" or \"ordinal\"; this column is numeric")
            return self
        if self.levels is None:
            raise ValueError(f"kind = \"{self.kind}\" needs levels = [...] (the declared "
                             "labels, public domain knowledge)")
        if self.kind == "binary" and len(self.levels) != 2:
            raise ValueError(f"kind = \"binary\" expects exactly 2 levels, got "
                             f"{len(self.levels)}")
        if len(self.levels) < 2:
            raise ValueError(f"kind = \"{self.kind}\" expects at least 2 levels, got 1")
        if self.bounds is not None:
            raise ValueError("a coded column takes no bounds (its levels are its range)")
        return self

    @field_validator("bounds")
    @classmethod
    def _check_bounds(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is None:
            return v
        lo, hi = float(v[0]), float(v[1])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"expected finite [lo, hi], got [{lo}, {hi}]")
        if not lo < hi:
            raise ValueError(f"expected lo < hi, got [{lo:g}, {hi:g}]")
        return (lo, hi)


class TableSchema(BaseModel):
    """An ordered list of columns plus the global missing markers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: list[ColumnSpec] = Field(min_length=1)
    missing: list[StrictStr] = Field(default_factory=lambda: list(DEFAULT_MISSING))

    @model_validator(mode="after")
    def _unique_names(self) -> TableSchema:
        seen: set[str] = set()
        dups = [c.name for c in self.columns if c.name in seen or seen.add(c.name)]
        if dups:
            raise ValueError(f"expected unique column names, got duplicates {sorted(set(dups))}")
        return self

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> TableSchema:
        """Build from the TOML-shaped dict (``{"missing": [...], "columns": {name: {...}}}``).

        Raises :class:`SchemaError` naming ``source`` and the offending key.
        """
        if not isinstance(data, Mapping):
            raise SchemaError(f"{source}: expected a table at top level, got {type(data).__name__}")
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            raise SchemaError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"expected only 'missing' and [columns.\"<name>\"] tables"
            )
        if "columns" not in data:
            raise SchemaError(
                f"{source}: columns: missing; expected at least one "
                f'[columns."<name>"] table with bounds = [lo, hi]'
            )
        cols = data["columns"]
        if not isinstance(cols, Mapping):
            raise SchemaError(
                f'{source}: columns: expected tables like [columns."age"], '
                f"got {type(cols).__name__}"
            )
        if not cols:
            raise SchemaError(f"{source}: columns: expected at least one column, got none")
        problems: list[str] = []
        specs: list[ColumnSpec] = []
        for name, spec in cols.items():
            key = f"columns.{toml_string(name)}"
            if not isinstance(spec, Mapping):
                problems.append(f"{key}: expected a table (e.g. bounds = [0, 120]), got {spec!r}")
                continue
            if "name" in spec:
                problems.append(f"{key}.name: unknown key; the column name is the table key itself")
                continue
            try:
                specs.append(ColumnSpec.model_validate({**spec, "name": name}))
            except ValidationError as exc:
                problems.extend(_format_errors(exc, key))
        top: dict[str, Any] = {"columns": specs}
        if "missing" in data:
            try:
                top["missing"] = _MARKERS.validate_python(data["missing"])
            except ValidationError as exc:
                problems.extend(_format_errors(exc, "missing"))
        if problems:
            raise SchemaError(_join(source, problems))
        try:
            return cls.model_validate(top)
        except ValidationError as exc:
            raise SchemaError(_join(source, _format_errors(exc, ""))) from None

    # -- queries ------------------------------------------------------------------------

    @property
    def column_names(self) -> list[str]:
        """Column names in schema order."""
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnSpec:
        """The spec of column ``name`` (SchemaError if unknown)."""
        for c in self.columns:
            if c.name == name:
                return c
        raise SchemaError(f"unknown column {name!r}; schema columns are {self.column_names}")

    def markers_for(self, column_name: str) -> set[str]:
        """Strings meaning "missing" in ``column_name``: global markers plus the column's own."""
        return set(self.missing) | set(self.column(column_name).missing)

    def bounds_array(self) -> np.ndarray:
        """Public bounds as an (m, 2) float array ``[[lo, hi], ...]`` in column order; a
        coded column's range is its codes, ``[0, n_levels - 1]``."""
        lacking = [c.name for c in self.columns if c.bounds is None and not c.coded]
        if lacking:
            raise SchemaError(
                f"columns {lacking} have no bounds; expected bounds = [lo, hi] "
                f"(public domain knowledge) for every numeric column"
            )
        return np.array([(0.0, float(len(c.levels) - 1)) if c.levels else c.bounds
                         for c in self.columns], dtype=np.float64).reshape(-1, 2)

    @property
    def has_coded_columns(self) -> bool:
        """Whether any column is binary, categorical or ordinal."""
        return any(c.coded for c in self.columns)

    def code_kinds(self) -> dict[int, tuple[str, tuple[float, ...]]]:
        """The coded columns as the engines' ``column_kinds`` over a table read with this
        schema, whose coded cells hold codes: ``{position: (kind, (0, 1, ..., L - 1))}``."""
        return {j: (c.kind, tuple(float(code) for code in range(len(c.levels))))
                for j, c in enumerate(self.columns) if c.levels is not None}

    def column_levels(self) -> list[tuple[Level, ...] | None]:
        """Per column in order, its declared levels (None: a numeric column)."""
        return [c.levels for c in self.columns]

    # -- serialisation ------------------------------------------------------------------

    def canonical_json(self) -> str:
        """Formatting-independent JSON form (marker lists sorted and de-duplicated)."""
        doc = {
            "format": _SCHEMA_FORMAT_VERSION,
            "missing": sorted(set(self.missing)),
            "columns": [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "bounds": None if c.bounds is None else [float(b) for b in c.bounds],
                    "missing": sorted(set(c.missing)),
                    "impute": c.impute,
                    # Only coded columns carry levels: a numeric schema keeps its hash.
                    **({} if c.levels is None else {"levels": list(c.levels)}),
                }
                for c in self.columns
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)

    def schema_hash(self) -> str:
        """SHA-256 hex digest of :meth:`canonical_json`: same schema, same hash."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def to_toml(self) -> str:
        """TOML text that :func:`load_schema` reads back to an equal schema."""
        tables: dict[str, dict[str, Any]] = {"": {"missing": list(self.missing)}}
        for c in self.columns:
            tables[f"columns.{toml_string(c.name)}"] = {
                "kind": c.kind,
                "bounds": None if c.bounds is None else list(c.bounds),
                "levels": None if c.levels is None else [
                    int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53
                    else v for v in c.levels],
                "missing": list(c.missing),
                "impute": c.impute,
            }
        return toml_document(tables, header=_TOML_HEADER)


def load_schema(path: str | os.PathLike[str]) -> TableSchema:
    """Read and validate a TOML schema file (SchemaError naming the file on any problem)."""
    source = os.fspath(path)
    data = read_toml(path, SchemaError, "schema file")
    return TableSchema.from_dict(data, source=source)


def infer_schema(values: np.ndarray, columns: Sequence[str], margin: float = 0.0) -> TableSchema:
    """Schema with bounds from the observed min/max of ``values`` (n, m), NaN = missing.

    ``margin`` widens each range by that fraction of its width on both sides; a constant
    column is widened by ±max(|v|, 1)/2. Such bounds leak the data's extremes, so this
    warns: they are not differentially private and should be replaced by domain knowledge.
    """
    arr = np.asarray(values, dtype=np.float64)
    names = list(columns)
    if arr.ndim != 2:
        raise SchemaError(f"infer_schema: expected a 2-D (rows x columns) array, got {arr.ndim}-D")
    if arr.shape[1] != len(names):
        raise SchemaError(
            f"infer_schema: expected {arr.shape[1]} column names (one per column), got {len(names)}"
        )
    if not (math.isfinite(margin) and margin >= 0):
        raise SchemaError(f"infer_schema: expected a finite margin >= 0, got {margin}")
    if np.isinf(arr).any():
        bad = [names[j] for j in np.flatnonzero(np.isinf(arr).any(axis=0))]
        raise SchemaError(f"infer_schema: columns {bad} contain inf; expected finite values")
    empty = [names[j] for j in np.flatnonzero(np.isnan(arr).all(axis=0))]
    if empty:
        raise SchemaError(
            f"infer_schema: columns {empty} have no observed values; cannot infer bounds"
        )
    warnings.warn(
        "bounds inferred from the data are not differentially private (they reveal the "
        "data's extremes); replace them with public domain-knowledge bounds before any "
        "federated release",
        UserWarning,
        stacklevel=2,
    )
    specs = []
    for j, name in enumerate(names):
        lo, hi = float(np.nanmin(arr[:, j])), float(np.nanmax(arr[:, j]))
        if lo == hi:
            half = max(abs(lo), 1.0) / 2
            lo, hi = lo - half, hi + half
        width = hi - lo
        specs.append({"name": name, "bounds": (lo - margin * width, hi + margin * width)})
    try:
        return TableSchema.model_validate({"columns": specs})
    except ValidationError as exc:
        raise SchemaError(_join("infer_schema", _format_errors(exc, ""))) from None


#: A numeric column with at most this many distinct whole values is proposed as coded.
MAX_PROPOSED_LEVELS = 10
_NUMBER_TEXT = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"


def propose_kinds(names: Sequence[str], cells: Sequence[Sequence[str]]
                  ) -> dict[str, tuple[str, tuple[str | float, ...]]]:
    """Columns that look coded, as ``{name: (kind, levels)}``, from each column's observed
    (stripped, non-missing) cell texts: a column holding any non-number is categorical
    over its labels; one of at most :data:`MAX_PROPOSED_LEVELS` distinct whole numbers
    that repeat (at least twice as many cells as values) is categorical over them. Two
    levels make it binary; a column with a single label is left alone. The levels are read from the
    data, so a caller must say so and have them confirmed (or replaced by the full
    public list of levels) before any federated run."""
    import re

    number = re.compile(_NUMBER_TEXT)
    proposed: dict[str, tuple[str, tuple[str | float, ...]]] = {}
    for name, column in zip(names, cells, strict=True):
        distinct = set(column)
        if len(distinct) < 2:
            continue
        if all(number.fullmatch(text) for text in distinct):
            values = sorted({float(text) for text in distinct})
            if (len(values) > MAX_PROPOSED_LEVELS or not all(v.is_integer() for v in values)
                    or len(column) < 2 * len(values)):
                continue
            levels: tuple[str | float, ...] = tuple(values)
        else:
            levels = tuple(sorted(distinct))
        proposed[name] = ("binary" if len(levels) == 2 else "categorical", levels)
    return proposed


# -- helpers ----------------------------------------------------------------------------


def _level(level: Any) -> str | float:
    """A declared level: a non-empty string, or a finite number (held as a float)."""
    if isinstance(level, str):
        if not level.strip() or level != level.strip():
            raise ValueError(f"expected a level label without surrounding spaces, got "
                             f"{level!r}")
        return level
    if isinstance(level, float | int) and not isinstance(level, bool) and math.isfinite(level):
        return float(level)
    raise ValueError(f"expected levels that are strings or finite numbers, got {level!r}")


def _level_key(level: str | float) -> tuple[int, str | float]:
    """Levels compare by type and value (the number 1 and the string "1" differ)."""
    return (0, level) if isinstance(level, str) else (1, level)


def _format_errors(exc: ValidationError, prefix: str) -> list[str]:
    """Pydantic errors as "key: expected ... (got ...)" lines with TOML-style key paths."""
    return error_lines(exc, prefix=prefix, allowed_keys=_allowed_keys(prefix),
                       describe=_describe)


def _describe(err: ErrorDetails) -> str | None:
    """Schema-specific wording (None: the shared default of :func:`error_lines`)."""
    if "bounds" in err["loc"] and err["type"] not in ("value_error", "extra_forbidden"):
        return "expected bounds = [lo, hi]: two finite numbers with lo < hi"
    return _EXPECTED.get(err["type"])


_EXPECTED = {
    "string_type": "expected a string (in quotes)",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "list_type": "expected a list (array) of strings",
    "tuple_type": "expected a list (array)",
    "literal_error": "expected kind = \"numeric\", \"binary\", \"categorical\" or "
                     "\"ordinal\"",
}


def _allowed_keys(prefix: str) -> list[str]:
    if prefix.startswith("columns."):
        return [f for f in ColumnSpec.model_fields if f != "name"]
    return list(_TOP_KEYS)


def _join(source: str, problems: list[str]) -> str:
    return join_errors(source, problems, noun="schema errors")
