"""Downstream checks in studies: the regression record, per-site missingness, the config
keys' errors, and a study end to end (its report's table)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulations import StudyConfigError, run_study, study_from_dict
from simulations.config import DownstreamConfig, MissingnessConfig
from simulations.downstream import downstream_record, fit_coefficient, summarise_downstream
from simulations.methods import Task, compute_task
from simulations.missingness import apply_missingness, site_missingness
from simulations.runner import validate_data
from tests.simulations.test_simulations import DIABETES_BOUNDS

NAMES = ["small", "mid", "big"]


def downstream_study(**extra: Any) -> dict[str, Any]:
    """Diabetes as three sites; s5 regressed on bmi, bp and s6 (the coefficient of bmi)."""
    return {
        "study": {"name": "down", "methods": ["local", "centralized", "federated", "knn"],
                  "epsilons": [math.inf], "seeds": [0]},
        "missingness": {"mechanism": "mcar", "rate": 0.15,
                        "columns": ["bmi", "bp", "s6", "s5"],
                        "sites": {"small": {"mechanism": "mar", "rate": 0.3,
                                            "driver": "age"}}},
        "datasets": [{"name": "diab", "builtin": "diabetes",
                      "partition": {"kind": "size_skew", "rows": [42, 100, 300],
                                    "site_names": NAMES}}],
        "bounds": DIABETES_BOUNDS,
        "downstream": {"model": "linear", "target": "s5", "features": ["bmi", "bp", "s6"],
                       "coefficient": "bmi", "n_imputations": 2},
        **extra,
    }


# -- the record ---------------------------------------------------------------------------
def _sites(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sites = []
    for n_rows in (80, 120):
        x = rng.normal(size=(n_rows, 2))
        y = 0.5 + 1.5 * x[:, 0] - x[:, 1] + rng.normal(0, 1, n_rows)
        sites.append(np.column_stack([x, y]))
    return sites


def test_a_perfect_imputation_has_no_bias_and_covers() -> None:
    truth = _sites()
    truth[1][0, 0] = np.nan  # a real gap: the row has no truth and is left out
    cfg = DownstreamConfig(target="y", coefficient="a", n_imputations=2)
    record = downstream_record(cfg, ["a", "b", "y"], truth, truth, [truth, truth])
    assert record["n_rows"] == 199
    reference = fit_coefficient(np.vstack([truth[0], truth[1][1:]]), 2, 0).estimate
    assert record["reference"] == pytest.approx(reference)
    assert record["single"]["estimate"] == pytest.approx(reference)
    assert record["single"]["covers"] and record["multiple"]["covers"]
    # identical draws: no between-imputation variance, the interval barely moves
    width = record["single"]["high"] - record["single"]["low"]
    assert record["multiple"]["high"] - record["multiple"]["low"] == pytest.approx(width,
                                                                                   rel=0.01)


def test_a_shifted_imputation_is_biased_and_a_logistic_fit_scores_the_truth() -> None:
    truth = _sites(1)
    shifted = [x.copy() for x in truth]
    for x in shifted:
        x[:, 0] = x[:, 0] * 2.0  # the regressor doubled: its coefficient halves
    cfg = DownstreamConfig(target="y", coefficient="a", n_imputations=2)
    record = downstream_record(cfg, ["a", "b", "y"], truth, shifted, None)
    assert record["single"]["estimate"] == pytest.approx(record["reference"] / 2, rel=1e-6)
    assert not record["single"]["covers"] and record["multiple"] is None
    logistic = DownstreamConfig(model="logistic", target="y", threshold=0.5, coefficient="a")
    record = downstream_record(logistic, ["a", "b", "y"], truth, truth, None)
    assert 0.6 < record["single"]["accuracy"] <= 1 and 0.7 < record["single"]["auc"] <= 1
    assert record["reference_auc"] == record["single"]["auc"]


def test_summary_means_bias_and_counts_coverage_over_seeds() -> None:
    def rec(seed: int, estimate: float, covers: bool) -> dict[str, Any]:
        arm = {"estimate": estimate, "covers": covers, "accuracy": None, "auc": 0.8}
        return {"dataset": "d", "method": "local", "epsilon": None, "seed": seed,
                "downstream": {"reference": 1.0, "single": arm, "multiple": None}}

    summary = summarise_downstream([rec(0, 1.2, False), rec(1, 1.0, True), {"dataset": "d"}])
    cell = summary["d"]["local"][""]
    assert cell["n_seeds"] == 2 and cell["multiple"] is None
    assert cell["single"]["bias"] == pytest.approx(0.1)
    assert cell["single"]["coverage"] == 0.5
    assert cell["single"]["accuracy"] is None and cell["single"]["auc"] == pytest.approx(0.8)


# -- missingness per site -----------------------------------------------------------------
def test_a_named_site_gets_its_own_mechanism_and_the_others_keep_theirs() -> None:
    rng = np.random.default_rng(3)
    sites = [rng.normal(size=(n, 4)) for n in (100, 400, 300)]
    shared = MissingnessConfig(mechanism="mcar", rate=0.05)
    own = MissingnessConfig(mechanism="mar", rate=0.4, driver="w")
    cfg = MissingnessConfig(mechanism="mcar", rate=0.05, sites={"b": own})
    plain = apply_missingness(sites, list("wxyz"), shared, 7, ["a", "b", "c"])
    masks = site_missingness(sites, list("wxyz"), cfg, 7, ["a", "b", "c"])
    assert np.array_equal(masks[0], plain[0]) and np.array_equal(masks[2], plain[2])
    assert not masks[1][:, 0].any()  # the driver is never hidden
    assert masks[1][:, 1:].mean() == pytest.approx(0.4, abs=0.05)
    # MAR on w: rows with a large w lose their cells more often
    high = sites[1][:, 0] > np.median(sites[1][:, 0])
    assert masks[1][high, 1:].mean() > 1.5 * masks[1][~high, 1:].mean()


# -- config errors ------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "needle"), [
    ({"downstream": {"target": "s5", "coefficient": "s5"}}, "downstream.coefficient"),
    ({"downstream": {"target": "s5", "features": ["bmi", "s5"], "coefficient": "bmi"}},
     "downstream.features"),
    ({"downstream": {"target": "s5", "features": ["bmi"], "coefficient": "bp"}},
     "downstream.coefficient"),
    ({"downstream": {"target": "s5", "coefficient": "bmi", "threshold": 1}},
     "downstream.threshold"),
    ({"downstream": {"target": "s5", "coefficient": "bmi", "n_imputations": 1}},
     "downstream.n_imputations"),
    ({"downstream": {"target": "s5", "coefficient": "bmi", "model": "probit"}},
     "downstream.model"),
    ({"downstream": {"target": "s5", "coefficient": "bmi", "extra": 1}}, "downstream.extra"),
    ({"missingness": {"sites": {"small": {"mechanism": "mar"}}}},
     "missingness.sites.small.driver"),
    ({"missingness": {"sites": {"small": {"sites": {"mid": {}}}}}}, "missingness.sites.small"),
])
def test_config_errors_name_the_key(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(StudyConfigError, match=needle.replace(".", r"\.")):
        study_from_dict(downstream_study(**change))


@pytest.mark.parametrize(("change", "needle"), [
    ({"downstream": {"target": "nope", "coefficient": "bmi"}}, "downstream.target"),
    ({"downstream": {"target": "s5", "features": ["bmi", "nope"], "coefficient": "bmi"}},
     r"downstream.features\[1\]"),
    ({"missingness": {"sites": {"tiny": {"mechanism": "mcar"}}}}, "missingness.sites.tiny"),
    ({"missingness": {"sites": {"small": {"mechanism": "mar", "driver": "nope"}}}},
     "missingness.sites.small.driver"),
])
def test_data_errors_name_the_key(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(StudyConfigError, match=needle):
        validate_data(study_from_dict(downstream_study(**change)))


# -- end to end ---------------------------------------------------------------------------
def test_a_study_reports_single_against_multiple_imputation(tmp_path: Path) -> None:
    study = study_from_dict(downstream_study())
    run = run_study(study, tmp_path / "out", workers=1, progress=False)
    records = {r["method"]: r for r in run.records}
    assert set(records) == {"local", "centralized", "federated", "knn"} and not run.failures
    for method in ("local", "centralized", "federated"):
        down = records[method]["downstream"]
        assert down["multiple"] is not None
        assert down["multiple"]["low"] < down["multiple"]["estimate"] < down["multiple"]["high"]
    assert records["knn"]["downstream"]["multiple"] is None
    assert len({r["downstream"]["reference"] for r in run.records}) == 1  # the same truth
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Downstream analysis" in report and "| federated | ∞ | 1 |" in report
    assert "at site `small`, its own: MAR" in report
    doc = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert doc["downstream"]["diab"]["local"][""]["n_seeds"] == 1


def test_a_study_without_downstream_records_none() -> None:
    raw = downstream_study()
    del raw["downstream"]
    raw["study"]["methods"] = ["local"]
    study = study_from_dict(raw)
    assert study.config.downstream is None
    (record,) = compute_task(Task(study, 0, 0, None, ("local",), ("k",)))
    assert "downstream" not in record
