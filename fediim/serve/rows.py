"""Rows of an imputation request, JSON records or a CSV body, checked against the schema.

Every problem is a :class:`~fediim.errors.DataError` naming the row (1 = the first data
row; in a CSV body, its line) and the column, so that the caller can fix the record. A
JSON error does not repeat the value; a CSV one may quote the caller's own cell. The
service returns the message to the caller and logs only the row and column.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fediim.errors import DataError
from fediim.io.schema import TableSchema
from fediim.io.table import LevelReader, format_level, parse_csv_text

__all__ = ["SOURCE", "RequestTooLarge", "rows_from_csv", "rows_from_json"]

#: How request errors name their source.
SOURCE = "request"


def rows_from_json(document: Any, schema: TableSchema, max_rows: int) -> np.ndarray:
    """``{"rows": [{column: number or null, ...}, ...]}`` as an (n, m) matrix, NaN where
    missing: a null, an absent column or one of the column's missing markers. A coded
    column's cell is one of its declared levels (a string, or a number of a numeric
    level), read as the level's code as a CSV body's is."""
    if not isinstance(document, dict) or not isinstance(document.get("rows"), list):
        raise DataError(SOURCE, 'expected a JSON object {"rows": [{column: value, ...}, ...]}')
    records = document["rows"]
    _check_count(len(records), max_rows)
    names = schema.column_names
    position = {name: j for j, name in enumerate(names)}
    markers = [schema.markers_for(name) for name in names]
    readers = [None if spec.levels is None else LevelReader(spec.levels)
               for spec in schema.columns]
    values = np.full((len(records), len(names)), np.nan)
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(SOURCE, "expected an object {column: value, ...}", row=number)
        for name, value in record.items():
            column = position.get(name)
            if column is None:
                raise DataError(SOURCE, f"unknown column; the schema's columns are {names}",
                                row=number, column=str(name)[:64])
            values[number - 1, column] = (
                _cell(value, markers[column], number, name) if readers[column] is None
                else _level_code(value, markers[column], readers[column], number, name))
    return values


def _level_code(value: Any, markers: set[str], levels: LevelReader, row: int, column: str
                ) -> float:
    """A coded column's JSON cell: its level's code, NaN when missing, else an error
    listing the declared levels (not the value)."""
    if value is None or (isinstance(value, str) and value.strip() in markers):
        return math.nan
    code = None
    if isinstance(value, str):
        code = levels.code(value.strip())
    elif isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value):
        code = levels.code(format_level(value))
    if code is None:
        raise DataError(SOURCE, f"expected one of the declared levels {levels.describe()}, "
                        "null or a missing marker", row=row, column=column)
    return float(code)


def _cell(value: Any, markers: set[str], row: int, column: str) -> float:
    if value is None or (isinstance(value, str) and value.strip() in markers):
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(SOURCE, f"expected a number, null or a missing marker, got a "
                        f"{type(value).__name__}", row=row, column=column)
    number = float(value)
    if not math.isfinite(number):
        raise DataError(SOURCE, "expected a finite number", row=row, column=column)
    return number


def rows_from_csv(text: str, schema: TableSchema, max_rows: int) -> np.ndarray:
    """A CSV body (header row = the schema's columns) as an (n, m) matrix, NaN missing."""
    table = parse_csv_text(text, SOURCE, schema=schema, allow_empty_columns=True)
    _check_count(table.n_rows, max_rows)
    return table.values


def _check_count(n_rows: int, max_rows: int) -> None:
    if n_rows == 0:
        raise DataError(SOURCE, "no rows; expected at least one")
    if n_rows > max_rows:
        raise RequestTooLarge(f"{n_rows} rows; at most {max_rows} per request (max_rows)")


class RequestTooLarge(DataError):
    """A request over the service's bounds (HTTP 413)."""

    def __init__(self, expected: str) -> None:
        super().__init__(SOURCE, expected)
