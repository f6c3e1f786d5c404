"""The one JSON encoding of results files (study results, benchmark results, cell caches).

Strict JSON has no infinity and no NaN, and results hold both (an epsilon of inf means
"no noise"; a standard error over one seed is inf). :func:`to_json_value` encodes:

- a finite float (Python or numpy) as a JSON number;
- ``+inf`` as the string ``"inf"`` and ``-inf`` as ``"-inf"`` (the same text as the
  epsilon keys ``"0.5"``, ``"inf"`` of a results file, and ``float("inf")`` reads it back);
- NaN as ``null`` (there is no value);
- numpy integers and booleans as ints and booleans, numpy arrays and tuples as lists,
  paths as strings, dict keys as strings.

Anything else JSON cannot hold is an error, not a silent ``str()``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import PurePath
from typing import Any

import numpy as np

from fediim.io.atomic import atomic_write_text

__all__ = ["dumps_results", "to_json_value", "write_results"]


def _float(value: float) -> float | str | None:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return None
    return "inf" if value > 0 else "-inf"


def to_json_value(obj: Any) -> Any:
    """``obj`` with every value made strict-JSON (see the module docstring)."""
    if isinstance(obj, dict):
        return {str(k): to_json_value(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json_value(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_json_value(v) for v in obj.tolist()]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return _float(float(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def dumps_results(obj: Any, indent: int = 1) -> str:
    """``obj`` as strict JSON text with a final newline."""
    return json.dumps(to_json_value(obj), indent=indent, allow_nan=False) + "\n"


def write_results(path: str | os.PathLike[str], obj: Any, indent: int = 1) -> None:
    """Write ``obj`` as strict JSON to ``path``, atomically (creating its folder)."""
    atomic_write_text(path, dumps_results(obj, indent))
