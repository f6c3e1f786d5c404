"""benchmarks/skewed_quick.py: the small site's numbers on the current code, no cache kept."""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.paths import benchmark_script
from tests.simulations.test_simulations import DIABETES_BOUNDS


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> Any:
    return benchmark_script(monkeypatch, "skewed_quick.py", "skewed_quick")


def test_prints_the_small_site_per_method_and_its_absent_column(
        quick: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "skew.toml"
    toml.write_text(textwrap.dedent("""\
        [study]
        name = "skew"
        methods = ["local", "mean"]
        epsilons = [1]
        [missingness]
        site_rates = { small = 0.3 }
        [[datasets]]
        name = "diab_absent"
        builtin = "diabetes"
        [datasets.partition]
        kind = "size_skew"
        rows = [42, 400]
        site_names = ["small", "big"]
        [datasets.absent]
        small = ["bmi"]
        """) + "[bounds]\n" + "\n".join(f"{k} = {v}" for k, v in DIABETES_BOUNDS.items()))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert quick.main(["--study", str(toml), "--seeds", "0,1", "--eps", "inf"]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines()]
    for seed in ("0", "1"):
        for method in ("local", "centralized", "federated", "hybrid"):
            row = next(r for r in lines if r[:3] == ["diab_absent", seed, method])
            assert row[3] == ("-" if method in ("local", "centralized") else "inf")
            assert 0 < float(row[4]) < 2                  # the small site's NRMSE
            assert row[5] == "bmi"
            assert (row[6] == "—") == (method == "local")  # local cannot fill bmi in
    assert "## diab_absent: site `small` (42 of 442 rows" in out
    assert "| hybrid − min(local, federated) | " in out and "Never-measured column `bmi`" in out
    assert list((tmp_path / "tmp").iterdir()) == []      # the cache went with the run
