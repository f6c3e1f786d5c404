"""A study over a mixed table (coded columns declared in ``[datasets.levels]``): every
method imputes declared levels, records carry the categorical accuracy pooled and per
site, and report.md shows it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fediim.cli import main as fediim_main
from simulations import StudyConfigError, study_from_dict


def _sites(folder: Path, sizes: tuple[int, int] = (220, 160)) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name, n in zip(("north", "south"), sizes, strict=True):
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["age", "smoker", "stage", "pressure"])
            for _ in range(n):
                age = rng.uniform(20, 90)
                stage = int(np.clip((age - 20) // 18 + 1, 1, 4))
                smoker = int(rng.random() < 0.4)
                writer.writerow([f"{age:.1f}", smoker, stage,
                                 f"{90 + age + 8 * smoker + rng.normal(0, 4):.1f}"])


STUDY = """\
[study]
name = "coded"
methods = ["local", "knn", "mean", "federated"]
epsilons = [4]
seeds = [0]
[missingness]
mechanism = "mcar"
rate = 0.15
[[datasets]]
name = "clinic"
path = "{folder}"
files = ["north.csv", "south.csv"]
code_columns = ["smoker", "stage"]
[datasets.partition]
kind = "natural"
[datasets.levels]
smoker = {{ kind = "binary", levels = [0, 1] }}
stage = {{ kind = "categorical", levels = [1, 2, 3, 4] }}
[bounds]
age = [0, 120]
smoker = [0, 1]
stage = [1, 4]
pressure = [50, 250]
"""


def test_study_reports_categorical_accuracy(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _sites(tmp_path / "data")
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(folder=tmp_path / "data"), encoding="utf-8")
    out = tmp_path / "out"
    assert fediim_main(["study", str(path), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["method"] for r in records} == {"local", "knn", "mean", "federated"}
    for record in records:
        assert set(record["accuracy_site"]) == {"north", "south"}
        assert sum(record["n_coded_masked_site"].values()) > 20
        assert 0.0 <= record["accuracy"] <= 1.0
    by_method = {r["method"]: r["accuracy"] for r in records}
    # The stage follows age: IIM beats the mode by far.
    assert by_method["local"] > by_method["mean"] + 0.15
    report = (out / "report.md").read_text()
    assert "## Categorical accuracy" in report
    assert "| federated (ε = 4) |" in report and "| method | pooled | north | south |" in report


def test_levels_are_checked() -> None:
    raw = {"study": {"name": "x", "methods": ["local"]},
           "datasets": [{"name": "d", "builtin": "diabetes",
                         "partition": {"kind": "iid", "sites": 2},
                         "levels": {"sex": {"kind": "binary", "levels": [1, 2, 3]}}}]}
    with pytest.raises(StudyConfigError, match="exactly 2 levels"):
        study_from_dict(raw)


DOWNSTREAM = """
[downstream]
model = "linear"
target = "pressure"
features = ["age", "smoker", "stage"]
coefficient = "smoker"
n_imputations = 2
"""


def test_a_study_with_coded_columns_fits_the_downstream_model_on_drawn_levels(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """[downstream] with [datasets.levels]: the multiple-imputation arm draws the coded
    predictors as levels (centralized and from the private bank) and pools the fits."""
    _sites(tmp_path / "data", sizes=(100, 80))
    path = tmp_path / "study.toml"
    text = STUDY.format(folder=tmp_path / "data").replace(
        'methods = ["local", "knn", "mean", "federated"]',
        'methods = ["centralized", "federated"]').replace(
        "rate = 0.15", 'rate = 0.2\ncolumns = ["smoker", "stage"]')  # the coded predictors
    path.write_text(text + DOWNSTREAM, encoding="utf-8")
    out = tmp_path / "out"
    assert fediim_main(["study", str(path), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    records = json.loads((out / "results.json").read_text())["records"]
    assert {r["method"] for r in records} == {"centralized", "federated"}
    for record in records:
        down = record["downstream"]
        multiple = down["multiple"]
        assert multiple is not None and multiple["low"] < multiple["estimate"] < multiple["high"]
        # the smoker effect (8 mm Hg) near its complete-data fit
        assert abs(multiple["estimate"] - down["reference"]) < multiple["high"] - multiple["low"]
        assert abs(down["reference"] - 8) < 3
    assert "## Downstream analysis" in (out / "report.md").read_text()
