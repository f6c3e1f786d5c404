"""The ``make demo`` job: a real (one-seed) run prints its tables and writes the report."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from fediim.cli import demo
from tests.paths import REPO


def test_demo_reads_the_shipped_diabetes_study() -> None:
    path = demo.demo_study_path()
    assert path == REPO / "simulations" / "studies" / "diabetes.toml"  # editable install
    study = demo.demo_study()
    assert study.source == str(path)
    s = study.config.study
    assert s.methods == ["local", "federated", "hybrid", "centralized", "knn", "mean"]
    assert s.seeds == [0, 1, 2] and [str(e) for e in s.epsilons] == ["1.0", "4.0", "inf"]
    quick = demo.demo_study(seeds=[0]).config
    assert quick.study.seeds == [0] and quick.bounds == study.config.bounds


def test_shipped_studies_are_package_data() -> None:
    """A non-editable install carries every study (the demo reads diabetes.toml from it)."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        patterns = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["simulations"]
    package = REPO / "simulations"
    shipped = {f for pattern in patterns for f in package.glob(pattern)}
    studies = set((package / "studies").glob("*.toml"))
    assert studies and studies <= shipped


def test_demo_runs_and_writes_the_report(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(out_dir=tmp_path, seeds=(0,), workers=2, progress=False) == 0
    out = capsys.readouterr().out

    # the method x epsilon table
    header = next(line for line in out.splitlines() if line.strip().startswith("method"))
    assert re.findall(r"ε=\S+", header) == ["ε=1", "ε=4", "ε=∞"]
    nrmse: dict[str, list[float]] = {}
    for line in out.splitlines():
        m = re.match(r"\s+(local|federated|hybrid|centralized|knn|mean)\s+(.*)$", line)
        if m:
            nrmse[m.group(1)] = [float(x) for x in re.findall(r"\d+\.\d{3}", m.group(2))]
    assert set(nrmse) == {"local", "federated", "hybrid", "centralized", "knn", "mean"}
    assert len(nrmse["hybrid"]) == 3 and len(nrmse["local"]) == 1
    assert 0.8 < nrmse["mean"][0] < 1.2                 # the column mean is the ~1 level
    assert nrmse["centralized"][0] < nrmse["mean"][0]
    assert nrmse["federated"][2] < nrmse["federated"][0]  # epsilon = inf beats epsilon = 1

    # privacy spent per hospital
    for site in ("A", "B", "C", "D"):
        assert re.search(rf"^\s+{site}\s+\d+\s+[01]\.\d\d of 1\s+\d\.\d\d of 4\s+none", out,
                         re.M), site
    assert "report: " in out and "study: 10 cells" in out

    # the bank against the column mean, and each hospital's gain from joining
    assert re.search(r"at ε=1 the private bank alone is (better|worse) than the column mean "
                     r"of all records pooled \(\d\.\d{3} vs \d\.\d{3}, [+-]\d+\.\d%\)", out)
    for site in ("A", "B", "C", "D"):
        assert re.search(rf"^\s+{site} \(\s*\d+ patients\): \d\.\d{{3}} -> \d\.\d{{3}}  "
                         r"\([+-]\d\.\d{3} ± (\d\.\d{3}|inf), [+-]\d+\.\d%\)$", out, re.M), site

    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.md", "results.json", "results.csv", "nrmse_vs_epsilon.png", "per_site.png",
            "privacy_spent.png", "cache", "hospital_D_masked.csv", "hospital_D_imputed.csv",
            "hospital_D_imputed.flags.csv", "hospital_D_imputed.audit.jsonl"} <= names
    report = (tmp_path / "report.md").read_text()
    assert "Four hospitals" in report and "![nrmse](nrmse_vs_epsilon.png)" in report
    assert "## What joining gains each site" in report
    audit = (tmp_path / "hospital_D_imputed.audit.jsonl").read_text().splitlines()
    assert audit and json.loads(audit[0])["method"] == "iim"
    # sex is declared binary (levels 1, 2): every imputed cell is a level, with its probability
    imputed = (tmp_path / "hospital_D_imputed.csv").read_text().splitlines()
    sex = imputed[0].split(",").index("sex")
    assert {line.split(",")[sex] for line in imputed[1:]} <= {"1", "2"}
    flags = (tmp_path / "hospital_D_imputed.flags.csv").read_text().splitlines()
    assert "sex_probability" in flags[0].split(",")
    assert "$ fediim impute" in out


def test_bounds_span_is_in_standard_deviations_of_the_data() -> None:
    """The demo's explanation of the federated-only number: public bounds / data spread."""
    from sklearn.datasets import load_diabetes

    from fediim.cli.demo import bounds_span_sd

    d = load_diabetes(scaled=False)
    glucose = d.feature_names.index("s6")  # bounds 40-300 mg/dl: the widest in sds
    med, widest = bounds_span_sd()
    assert widest == pytest.approx(260.0 / d.data[:, glucose].std())
    assert 2.0 < med < widest
