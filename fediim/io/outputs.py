"""What a site writes after imputing: the table, the per-cell flags, schema rules applied.

One implementation for the ``fediim impute`` CLI and the Flower site, so both give a user
the same files.
"""

from __future__ import annotations

import csv
from typing import IO

import numpy as np

from fediim.io.result import ImputationResult
from fediim.io.schema import TableSchema
from fediim.io.table import format_level

__all__ = ["apply_schema", "format_cell", "write_table", "write_flags"]


def apply_schema(result: ImputationResult, schema: TableSchema, columns: list[str]) -> None:
    """Undo imputation in columns marked ``impute = false``; clip imputed cells to bounds."""
    for j, name in enumerate(columns):
        spec = schema.column(name)
        cells = result.imputed[:, j].copy()
        if not spec.impute:
            result.values[cells, j] = np.nan
            result.imputed[cells, j] = False
            result.uncertainty[cells, j] = np.nan
            result.method[cells, j] = ""
            result.ell[cells, j] = np.nan
            result.n_candidates[cells, j] = 0
        elif spec.levels is not None:  # a code outside the levels cannot be written
            result.values[cells, j] = np.clip(np.round(result.values[cells, j]), 0,
                                              len(spec.levels) - 1)
        elif spec.bounds is not None:
            lo, hi = spec.bounds
            result.values[cells, j] = np.clip(result.values[cells, j], lo, hi)


def format_cell(v: float) -> str:
    """CSV field for a table value: empty if missing, else its shortest exact text
    (integral values without a trailing ``.0``, so ``59`` stays ``59``)."""
    f = float(v)
    if np.isnan(f):
        return ""
    if f.is_integer() and abs(f) < 2**53:
        return str(int(f))
    return repr(f)


def write_table(fh: IO[str], values: np.ndarray, columns: list[str],
                schema: TableSchema | None = None) -> None:
    """The imputed table: same columns, same order, observed cells as read; a coded
    column of ``schema`` writes each code as its level's label."""
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(columns)
    levels = [None if schema is None else schema.column(name).levels for name in columns]
    for row in values:
        writer.writerow([format_cell(v) if labels is None or np.isnan(v)
                         else format_level(labels[int(v)])
                         for v, labels in zip(row, levels, strict=True)])


def write_flags(fh: IO[str], result: ImputationResult, columns: list[str],
                schema: TableSchema | None = None) -> None:
    """Per cell: ``<col>_imputed`` (0/1), ``<col>_uncertainty`` (candidate spread; for a
    binary or categorical column 1 - probability) and ``<col>_method`` (how it was
    imputed; the fallback rate is read off it); a binary or categorical column of
    ``schema`` adds ``<col>_probability``, the imputed level's voted probability."""
    voted = [schema is not None and schema.column(c).kind in ("binary", "categorical")
             for c in columns]
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow([f"{c}{s}" for c, vote in zip(columns, voted, strict=True)
                     for s in ("_imputed", "_uncertainty", "_method")
                     + (("_probability",) if vote else ())])
    probability = (result.probability if result.probability is not None
                   else np.full(result.values.shape, np.nan))
    for imp, unc, method, prob in zip(result.imputed, result.uncertainty, result.method,
                                      probability, strict=True):
        fields: list[str] = []
        for flag, u, how, p, vote in zip(imp, unc, method, prob, voted, strict=True):
            fields.append("1" if flag else "0")
            fields.append(f"{u:.6g}" if flag and np.isfinite(u) else "")
            fields.append(str(how) if flag else "")
            if vote:
                fields.append(f"{p:.6g}" if flag and np.isfinite(p) else "")
        writer.writerow(fields)
