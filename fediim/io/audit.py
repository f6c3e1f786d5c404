"""Audit records: one JSON object per imputed cell, saying how its value was produced.

An audit record names methods and opaque ids, never another record's values: it tells a
reviewer *which* method filled a cell, with which settings (k, the chosen ℓ), from how many
candidates and with what spread — but it never copies a value of any other record (a
neighbour, a training row, a site's data) into the log. The only value it carries is the
imputed value of the cell itself, which is already in the imputed table.

Records are written as JSON Lines (one object per line, UTF-8), atomically::

    {"row": 3, "column": "bmi", "method": "iim", "k": 10, "ell": 12.5,
     "n_candidates": 10, "uncertainty": 0.41, "value": 27.3}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np

from fediim.io.atomic import atomic_open
from fediim.io.result import ImputationResult

__all__ = ["AUDIT_FIELDS", "audit_records", "dump_audit_jsonl", "write_audit_jsonl"]

AUDIT_FIELDS: tuple[str, ...] = (
    "row", "column", "method", "k", "ell", "n_candidates", "uncertainty", "value",
)
"""Keys of every audit record, in the order they are written."""


def _number(v: Any) -> float | None:
    """A finite float, or None (JSON null) for NaN / inf."""
    f = float(v)
    return f if math.isfinite(f) else None


def audit_records(
    result: ImputationResult, columns: Sequence[str], *, k: int, row_offset: int = 1,
    levels: Sequence[Sequence[str | float] | None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one audit record per imputed cell of ``result``, row by row, column by column.

    Fields: ``row`` (data row index + ``row_offset``; with the default 1 the first data row
    is 1, i.e. the CSV line is ``row + 1`` under a header), ``column`` (name), ``method``
    (``"iim"``, or ``"mean"`` when no training row had the needed attributes), ``k`` (the
    configured number of neighbours), ``ell`` (mean chosen ℓ of the neighbours' individual
    models, a global model counting as 0; null when not applicable), ``n_candidates``
    (candidates combined; 0 for the mean fallback), ``uncertainty`` (weighted spread of the
    candidates, in the column's units) and ``value`` (the imputed value). With ``levels``
    (per column, a coded column's declared levels, else None) a coded cell's ``value`` is
    its level's label and the record adds ``probability`` (the level's voted probability;
    null for an ordinal column).

    An audit record names methods and opaque ids, never another record's values.
    """
    names = [str(c) for c in columns]
    imputed = np.asarray(result.imputed, dtype=bool)
    if imputed.ndim != 2 or imputed.shape[1] != len(names):
        raise ValueError(
            f"audit_records: expected {len(names)} column names for a result of shape "
            f"{imputed.shape}"
        )
    for i, j in np.argwhere(imputed):
        record = {
            "row": int(i) + row_offset,
            "column": names[j],
            "method": str(result.method[i, j]),
            "k": int(k),
            "ell": _number(result.ell[i, j]),
            "n_candidates": int(result.n_candidates[i, j]),
            "uncertainty": _number(result.uncertainty[i, j]),
            "value": _number(result.values[i, j]),
        }
        labels = None if levels is None else levels[j]
        if labels is not None:
            record["value"] = labels[int(result.values[i, j])]
            probability = (np.nan if result.probability is None
                           else result.probability[i, j])
            record["probability"] = _number(probability)
        yield record


def dump_audit_jsonl(fh: IO[str], records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` to an open text file as JSON Lines; return how many were written."""
    count = 0
    for rec in records:
        fh.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
        count += 1
    return count


def write_audit_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Atomically write ``records`` to ``path`` as JSON Lines; return how many were written.

    If anything fails midway the file keeps its previous content (or stays absent).
    """
    with atomic_open(path, "w", newline="") as fh:
        return dump_audit_jsonl(fh, records)
