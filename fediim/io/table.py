"""Loading tables into a float matrix + missing mask, with no silent coercion.

Every value is either a finite number or an explicitly declared missing marker; anything
else is a :class:`DataError` naming the file (or ``<array>``), the row, the column and what
was expected (DESIGN §3). CSV is read with the ``csv`` module (not pandas) so an error can
point at the exact line of the file; pandas is only an optional input type.
"""

from __future__ import annotations

import csv
import decimal
import io
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fediim.errors import DataError
from fediim.io.atomic import atomic_open
from fediim.io.schema import DEFAULT_MISSING, TableSchema

__all__ = ["DataError", "LevelReader", "Table", "as_matrix", "check_representable",
           "format_level", "parse_csv_text", "read_cells", "read_csv", "write_csv"]

ARRAY_SOURCE = "<array>"

# A plain decimal number: no underscores, hex, unicode digits or inf/nan spellings
# (float() would accept all of those).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INF_WORDS = {"inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
_NAN_WORDS = {"nan", "+nan", "-nan"}


@dataclass
class Table:
    """A numeric table: ``values`` (n, m) float64 with NaN for missing, names, origin."""

    values: npt.NDArray[np.float64]
    columns: list[str]
    source: str = ARRAY_SOURCE

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.columns):
            raise ValueError(
                f"Table: expected values of shape (n, {len(self.columns)}), got {self.values.shape}"
            )

    @property
    def missing_mask(self) -> npt.NDArray[np.bool_]:
        """True where a cell is missing."""
        return np.isnan(self.values)

    @property
    def n_rows(self) -> int:
        """Number of rows (records)."""
        return int(self.values.shape[0])

    @property
    def n_cols(self) -> int:
        """Number of columns (attributes)."""
        return int(self.values.shape[1])


# -- CSV --------------------------------------------------------------------------------


def read_csv(
    path: str | os.PathLike[str],
    schema: TableSchema | None = None,
    missing_markers: Iterable[str] | None = None,
    allow_empty_columns: bool = False,
) -> Table:
    """Read a CSV file (header row required) into a :class:`Table`.

    A cell is missing iff, stripped of surrounding whitespace, it equals one of the markers
    for its column: ``missing_markers`` (default: the schema's global markers, else
    ``DEFAULT_MISSING``) plus the schema's per-column markers. Every other cell must be a
    finite decimal number, except in a column the schema declares coded (binary,
    categorical, ordinal): there a cell must be one of its declared levels, read as the
    level's code (0, 1, ...). With a schema, the header must equal the schema's columns.
    A column with no observed value is an error unless ``allow_empty_columns`` (a site of a
    federation that never measures an attribute can still have it imputed from the bank).
    """
    source = os.fspath(path)
    return parse_csv_text(_read_text(path, source), source, schema=schema,
                          missing_markers=missing_markers,
                          allow_empty_columns=allow_empty_columns)


def parse_csv_text(
    text: str,
    source: str,
    schema: TableSchema | None = None,
    missing_markers: Iterable[str] | None = None,
    allow_empty_columns: bool = False,
) -> Table:
    """:func:`read_csv` on CSV ``text`` already in memory (e.g. a request body), errors
    naming ``source``."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    names = _read_header(reader, source)
    if schema is not None:
        _check_against_schema(names, schema, source)
    markers = _column_markers(names, schema, missing_markers)
    values = _read_rows(reader, source, names, markers, _column_levels(names, schema))
    if not allow_empty_columns:
        _check_observed(values, names, source)
    check_representable(values, names, source)
    return Table(values=values, columns=names, source=source)


def read_cells(path: str | os.PathLike[str], missing_markers: Iterable[str] | None = None
               ) -> tuple[list[str], list[list[str]]]:
    """The header and, per column, its observed cells' stripped texts (missing markers
    left out): what a schema's kinds and levels are proposed from."""
    source = os.fspath(path)
    reader = csv.reader(io.StringIO(_read_text(path, source), newline=""), strict=True)
    names = _read_header(reader, source)
    markers = _column_markers(names, None, missing_markers)
    cells: list[list[str]] = [[] for _ in names]
    while (rec := _next_record(reader, source)) is not None:
        if len(rec) != len(names):
            continue  # read_csv reports malformed rows; here only the labels matter
        for column, text in zip(cells, rec, strict=True):
            if text.strip() not in markers[0]:
                column.append(text.strip())
    return names, cells


def _read_header(reader: Any, source: str) -> list[str]:
    """The header's column names, checked (non-empty, unique)."""
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataError(source, f"malformed CSV header: {exc}", row=1, row_desc="line 1") from None
    if header is None:
        raise DataError(source, "empty file; expected a header row with column names")
    return _check_header(header, source, reader.line_num)


def _column_markers(names: list[str], schema: TableSchema | None,
                    missing_markers: Iterable[str] | None) -> list[set[str]]:
    """Per column, the stripped strings that mean "missing" (global plus per-column)."""
    base = set(DEFAULT_MISSING) if missing_markers is None else set(missing_markers)
    if missing_markers is None and schema is not None:
        base = set(schema.missing)
    return [
        {s.strip() for s in base | (set(schema.column(n).missing) if schema else set())}
        for n in names
    ]


def _column_levels(names: list[str], schema: TableSchema | None) -> list[LevelReader | None]:
    """Per column, the reader of its declared levels (None: a numeric column)."""
    if schema is None:
        return [None] * len(names)
    return [None if schema.column(n).levels is None else LevelReader(schema.column(n).levels)
            for n in names]


class LevelReader:
    """Reads a coded column's cells: each label to its level's code (position 0, 1, ...).

    A string level matches its exact text; a numeric level matches any decimal spelling of
    its value (``1``, ``1.0``), so codes written as numbers read as declared."""

    def __init__(self, levels: Sequence[str | float]) -> None:
        self.levels = tuple(levels)
        self._text = {level: code for code, level in enumerate(levels) if isinstance(level, str)}
        self._number = {level: code for code, level in enumerate(levels)
                        if not isinstance(level, str)}

    def code(self, cell: str) -> int | None:
        """The code of ``cell`` (stripped), or None when it is no declared level."""
        if cell in self._text:
            return self._text[cell]
        if self._number and _NUMBER.fullmatch(cell):
            return self._number.get(float(cell))
        return None

    def describe(self) -> str:
        """The declared levels, as an error message lists them."""
        return "[" + ", ".join(format_level(level) if not isinstance(level, str) else
                               repr(level) for level in self.levels) + "]"


def format_level(level: str | float) -> str:
    """A level as a CSV field: a string as itself, a number in its shortest exact form."""
    if isinstance(level, str):
        return level
    f = float(level)
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


def _parse_label(cell: str, markers: set[str], levels: LevelReader, source: str, line: int,
                 column: str) -> float:
    """A coded column's cell: its level's code, NaN for a missing marker, else an error."""
    s = cell.strip()
    if s in markers:
        return float("nan")
    code = levels.code(s)
    if code is not None:
        return float(code)
    marker_list = ", ".join(repr(x) for x in sorted(markers))
    raise DataError(source, f"{cell!r} is not a declared level; expected one of the levels "
                    f"{levels.describe()} or a missing marker ({marker_list})", row=line,
                    row_desc=f"line {line}", column=column)


def _read_rows(reader: Any, source: str, names: list[str], markers: list[set[str]],
               levels: list[LevelReader | None] | None = None) -> np.ndarray:
    """Every data row parsed to floats (NaN = missing; a coded column's label to its
    level's code); trailing blank lines tolerated."""
    m = len(names)
    rows: list[list[float]] = []
    pending_blank: int | None = None  # trailing blank lines are tolerated, inner ones not
    while (rec := _next_record(reader, source)) is not None:
        line = reader.line_num
        if not rec:
            pending_blank = pending_blank or line
            continue
        if pending_blank is not None:
            raise DataError(
                source, f"blank line inside the data; expected {m} fields (one per header "
                "column)", row=pending_blank, row_desc=f"line {pending_blank}")
        if len(rec) != m:
            raise DataError(
                source, f"row has {len(rec)} field{'s' if len(rec) != 1 else ''}, expected "
                f"{m} (one per header column)", row=line, row_desc=f"line {line}")
        rows.append([_parse_cell(rec[j], markers[j], source, line, names[j])
                     if levels is None or levels[j] is None else
                     _parse_label(rec[j], markers[j], levels[j], source, line, names[j])
                     for j in range(m)])
    if not rows:
        raise DataError(source, "no data rows; expected at least one row after the header")
    return np.array(rows, dtype=np.float64).reshape(len(rows), m)


def _next_record(reader: Any, source: str) -> list[str] | None:
    """The next CSV record, or None at the end; malformed CSV is a :class:`DataError`."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        line = reader.line_num
        raise DataError(source, f"malformed CSV: {exc}", row=line,
                        row_desc=f"line {line}") from None


def _check_observed(values: np.ndarray, names: list[str], source: str) -> None:
    """Every column must have at least one observed value."""
    empty = [names[j] for j in np.flatnonzero(np.isnan(values).all(axis=0))]
    if empty:
        raise DataError(
            source,
            f"no observed values in column(s) {', '.join(map(repr, empty))} (every cell is a "
            f"missing marker); expected at least one observed value per column",
            column=empty[0] if len(empty) == 1 else None,
        )


def _read_text(path: str | os.PathLike[str], source: str) -> str:
    """The file's text (UTF-8, optional BOM), with decode errors located by line."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(source, "file not found; expected a CSV file") from None
    except IsADirectoryError:
        raise DataError(source, "is a directory; expected a CSV file") from None
    except OSError as exc:
        raise DataError(source, f"cannot read file: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            source, "invalid UTF-8 byte(s); expected UTF-8 text", row=line, row_desc=f"line {line}"
        ) from None


def _check_header(header: list[str], source: str, line: int) -> list[str]:
    where = {"row": line, "row_desc": f"line {line}"}
    if not header:
        raise DataError(source, "blank header; expected a row of column names", **where)
    names = [h.strip() for h in header]
    for j, name in enumerate(names):
        if not name:
            raise DataError(
                source,
                f"header field {j + 1} is empty; expected a non-empty name for every column",
                **where,
            )
    first: dict[str, int] = {}
    for j, name in enumerate(names):
        if name in first:
            raise DataError(
                source,
                f"duplicate column name (header fields {first[name] + 1} and {j + 1}); "
                f"expected unique names",
                column=name,
                **where,
            )
        first[name] = j
    return names


def _check_against_schema(names: list[str], schema: TableSchema, source: str) -> None:
    expected = schema.column_names
    if names == expected:
        return
    missing = [c for c in expected if c not in names]
    extra = [c for c in names if c not in expected]
    parts = []
    if missing:
        parts.append(f"missing columns {missing}")
    if extra:
        parts.append(f"unexpected columns {extra}")
    if not parts:
        parts.append("columns are in a different order than in the schema")
    raise DataError(
        source,
        "header does not match the schema: " + "; ".join(parts) + f"; expected header {expected}, "
        f"got {names}",
        row=1,
        row_desc="line 1",
    )


def _parse_cell(cell: str, markers: set[str], source: str, line: int, column: str) -> float:
    s = cell.strip()
    if s in markers:
        return float("nan")
    where: dict[str, Any] = {"row": line, "row_desc": f"line {line}", "column": column}
    marker_list = ", ".join(repr(x) for x in sorted(markers))
    if _NUMBER.fullmatch(s):
        v = float(s)
        if np.isfinite(v):
            return v
        raise DataError(
            source, f"{cell!r} overflows a 64-bit float; expected a finite number", **where
        )
    low = s.lower()
    if low in _INF_WORDS:
        raise DataError(
            source,
            f"{cell!r} is not finite; expected a finite number or a missing marker ({marker_list})",
            **where,
        )
    if low in _NAN_WORDS:
        raise DataError(
            source,
            f"{cell!r} is not a declared missing marker; expected a number or one of the "
            f"markers ({marker_list}) — declare {s!r} as a missing marker to accept it",
            **where,
        )
    raise DataError(
        source,
        f"{cell!r} is not a number; expected a number or a missing marker ({marker_list})",
        **where,
    )


def write_csv(
    path: str | os.PathLike[str],
    values: npt.ArrayLike,
    columns: Sequence[str],
    float_format: str | None = "%.10g",
) -> None:
    """Write a numeric table atomically as CSV; NaN becomes an empty field.

    ``float_format`` is a printf-style format; None writes ``repr`` (exact round trip).
    """
    source = os.fspath(path)
    arr = np.asarray(values, dtype=np.float64)
    names = [str(c) for c in columns]
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise DataError(
            source,
            f"expected values of shape (n, {len(names)}) matching the columns, got {arr.shape}",
        )
    inf = np.argwhere(np.isinf(arr))
    if len(inf):
        i, j = (int(x) for x in inf[0])
        raise DataError(
            source,
            f"cannot write {arr[i, j]}; expected finite numbers or NaN (missing)",
            row=i + 1,
            row_desc=f"row {i + 1} (0-based index {i})",
            column=names[j],
        )
    fmt = repr if float_format is None else (lambda v: float_format % v)
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(names)
        for row in arr:
            writer.writerow(["" if np.isnan(v) else fmt(float(v)) for v in row])


# -- in-memory inputs -------------------------------------------------------------------


def as_matrix(
    X: Any, columns: Sequence[str] | None = None
) -> tuple[npt.NDArray[np.float64], list[str], Any | None]:
    """Convert an array, nested list or pandas DataFrame into a float64 copy.

    Returns ``(values, column_names, index)``: names are the DataFrame's columns,
    ``columns`` if given, else ``x0, x1, ...``; ``index`` is the DataFrame index or None.
    None, NaN and pd.NA mean missing; strings, booleans and inf are rejected (DataError).
    """
    if _is_dataframe(X):
        values, names, index = _from_dataframe(X)
        if columns is not None and list(columns) != names:
            raise DataError(
                ARRAY_SOURCE,
                f"columns {list(columns)} differ from the DataFrame's columns {names}; "
                f"expected them to match (or omit columns)",
            )
    else:
        index = None
        values, names = _from_array(X, columns)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(ARRAY_SOURCE, "duplicate column name; expected unique", column=name)
        seen.add(name)
    _check_finite(values, names, index)
    check_representable(values, names, ARRAY_SOURCE)
    return values, names, index


def _is_dataframe(X: Any) -> bool:
    if not type(X).__module__.startswith("pandas"):
        return False
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - a pandas object without pandas
        return False
    return isinstance(X, pd.DataFrame)


def _check_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2:
        hint = "; use X.reshape(-1, 1) for a single column" if len(shape) == 1 else ""
        raise DataError(
            ARRAY_SOURCE, f"expected a 2-D table (rows x columns), got {what} shape {shape}{hint}"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise DataError(
            ARRAY_SOURCE, f"expected at least one row and one column, got shape {shape}"
        )


def _row_desc(i: int, index: Any | None) -> str:
    if index is None:
        return f"row {i + 1} (0-based index {i})"
    return f"row {i + 1} (index label {index[i]!r})"


def _from_array(X: Any, columns: Sequence[str] | None) -> tuple[npt.NDArray[np.float64], list[str]]:
    if isinstance(X, np.ndarray):
        arr = X
    else:
        # Always cell by cell: np.array() would silently turn True into 1 or 1 into "1".
        try:
            arr = np.array(X, dtype=object)
        except ValueError:  # ragged nested lists
            raise DataError(
                ARRAY_SOURCE, "rows have different lengths; expected a 2-D table"
            ) from None
        if arr.ndim == 1 and arr.size and any(isinstance(r, list | tuple) for r in arr):
            raise DataError(ARRAY_SOURCE, "rows have different lengths; expected a 2-D table")
    _check_shape(arr.shape, f"{arr.ndim}-D")
    m = arr.shape[1]
    names = [f"x{j}" for j in range(m)] if columns is None else [str(c) for c in columns]
    if len(names) != m:
        raise DataError(
            ARRAY_SOURCE, f"got {len(names)} column names, expected {m} (one per column)"
        )
    kind = arr.dtype.kind
    if kind in "iuf":
        return np.array(arr, dtype=np.float64, copy=True), names
    if kind == "b":
        raise DataError(ARRAY_SOURCE, "boolean array; expected numbers")
    if kind == "c":
        raise DataError(ARRAY_SOURCE, "complex array; expected real numbers")
    if kind in "OUS":
        out = np.empty(arr.shape, dtype=np.float64)
        for j in range(m):
            out[:, j] = _convert_objects(arr[:, j], names[j], None)
        return out, names
    raise DataError(ARRAY_SOURCE, f"array of dtype {arr.dtype}; expected numbers")


def _from_dataframe(df: Any) -> tuple[npt.NDArray[np.float64], list[str], Any]:
    import pandas as pd

    names = [str(c) for c in df.columns]
    _check_shape(df.shape, "DataFrame")
    index = df.index
    out = np.empty(df.shape, dtype=np.float64)
    for j in range(df.shape[1]):
        s = df.iloc[:, j]
        if pd.api.types.is_bool_dtype(s.dtype):
            raise DataError(
                ARRAY_SOURCE, f"boolean dtype {s.dtype}; expected numbers", column=names[j]
            )
        if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_complex_dtype(s.dtype):
            out[:, j] = s.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            out[:, j] = _convert_objects(s.to_numpy(dtype=object), names[j], index)
    return out, names, index


def _convert_objects(col: np.ndarray, name: str, index: Any | None) -> npt.NDArray[np.float64]:
    """Cell-by-cell conversion of one object column: real numbers or missing only."""
    out = np.empty(len(col), dtype=np.float64)
    for i, v in enumerate(col):
        if v is None or type(v).__name__ == "NAType":
            out[i] = np.nan
        elif isinstance(v, bool | np.bool_):
            raise DataError(
                ARRAY_SOURCE,
                f"boolean {v!r}; expected a number, or None/NaN for missing",
                row=i + 1,
                row_desc=_row_desc(i, index),
                column=name,
            )
        elif isinstance(v, numbers.Real | decimal.Decimal):
            out[i] = float(v)
        else:
            shown = repr(str(v)) if isinstance(v, str) else repr(v)
            raise DataError(
                ARRAY_SOURCE,
                f"{shown} ({type(v).__name__}) is not a number; expected a real number, or "
                f"None/NaN for missing (strings are not parsed; convert them explicitly)",
                row=i + 1,
                row_desc=_row_desc(i, index),
                column=name,
            )
    return out


def check_representable(values: np.ndarray, names: Sequence[str], source: str) -> None:
    """Every column's mean and spread must be finite in float64, or :class:`DataError`.

    The engines standardise columns and form sums of squares; finite values as large as
    ±1e308 overflow there and would come back as silent infinities or zero uncertainty.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        observed = np.isfinite(values)
        counts = observed.sum(axis=0)
        filled = np.where(observed, values, 0.0)
        means = filled.sum(axis=0) / np.maximum(counts, 1)
        spreads = (np.where(observed, values - means, 0.0) ** 2).sum(axis=0)
    bad = [j for j in range(values.shape[1])
           if counts[j] and not (np.isfinite(means[j]) and np.isfinite(spreads[j]))]
    if bad:
        biggest = float(np.nanmax(np.abs(values[:, bad[0]])))
        raise DataError(source, f"values up to {biggest:.3g} in magnitude: the column's mean or "
                        "spread overflows double precision; expected magnitudes below 1e150 "
                        "(rescale the column, e.g. change its unit)", column=names[bad[0]])


def _check_finite(values: np.ndarray, names: list[str], index: Any | None) -> None:
    bad = np.argwhere(np.isinf(values))
    if len(bad):
        i, j = (int(x) for x in bad[0])
        raise DataError(
            ARRAY_SOURCE,
            f"{values[i, j]} is not finite; expected a finite number, or NaN for missing",
            row=i + 1,
            row_desc=_row_desc(i, index),
            column=names[j],
        )
