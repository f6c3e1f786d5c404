"""The one JSON encoding of results: strict JSON, inf as text, NaN as null, numpy as Python."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fediim.io.json_results import dumps_results, to_json_value, write_results


def test_non_finite_numbers_and_numpy_values() -> None:
    doc = {"eps": math.inf, "low": -np.inf, "gap": math.nan, "n": np.int64(3),
           "ok": np.bool_(True), "x": np.float32(0.5), "rows": np.arange(3),
           "pair": (1.0, np.float64(np.inf)), 7: Path("a/b")}
    assert to_json_value(doc) == {"eps": "inf", "low": "-inf", "gap": None, "n": 3,
                                  "ok": True, "x": 0.5, "rows": [0, 1, 2],
                                  "pair": [1.0, "inf"], "7": "a/b"}
    text = dumps_results(doc)
    assert text.endswith("\n") and "Infinity" not in text and "NaN" not in text
    assert float(json.loads(text)["eps"]) == math.inf  # reads back with float()


def test_values_json_cannot_hold_are_an_error() -> None:
    with pytest.raises(TypeError):
        dumps_results({"when": object()})


def test_write_is_atomic_and_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "results.json"
    write_results(target, {"nrmse": 0.25, "se": math.inf})
    assert json.loads(target.read_text()) == {"nrmse": 0.25, "se": "inf"}
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]
