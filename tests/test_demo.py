"""The ``make demo`` job: runs quickly, prints both methods, IIM beats kNN, writes the files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fediim import demo


def test_demo_runs_and_iim_beats_knn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(out_dir=tmp_path) == 0
    out = capsys.readouterr().out
    assert "IIMImputer" in out and "KNNImputer" in out

    nrmse = {}
    for line in out.splitlines():
        m = re.match(r"\s+(fediim IIMImputer|sklearn KNNImputer)\S*.*?\s(\d+\.\d+) ±", line)
        if m:
            nrmse[m.group(1)] = float(m.group(2))
    assert set(nrmse) == {"fediim IIMImputer", "sklearn KNNImputer"}
    assert 0 < nrmse["fediim IIMImputer"] < nrmse["sklearn KNNImputer"] < 1.5

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "diabetes_imputed.audit.jsonl",
        "diabetes_imputed.csv",
        "diabetes_imputed.flags.csv",
        "diabetes_masked.csv",
    ]
    for name in names:
        assert str(tmp_path / name) in out
    audit = (tmp_path / "diabetes_imputed.audit.jsonl").read_text().splitlines()
    assert len(audit) == 22 and json.loads(audit[0])["method"] == "iim"


def test_mask_and_nrmse() -> None:
    X = np.arange(200, dtype=float).reshape(40, 5)
    masked, rows, cols = demo.mask_cells(X, seed=1)
    assert rows.size == 2 and np.isnan(masked).sum() == 2
    assert np.isnan(masked[rows, cols]).all()
    assert demo.nrmse(X, X, rows, cols, np.ones(5)) == 0.0
    shifted = X + 2.0
    assert demo.nrmse(shifted, X, rows, cols, np.full(5, 4.0)) == pytest.approx(0.5)
