"""The size-skewed and column-absent scenarios: exact site sizes, per-site masking rates,
never-measured columns (hidden whole, scored apart against the truth), their config
errors, and the report's smallest-site section."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulations import StudyConfigError, run_study, study_from_dict
from simulations.config import MissingnessConfig
from simulations.data import make_federation, partition_rows
from simulations.methods import Task, compute_task, prepare, score
from simulations.missingness import apply_missingness, mask_one_attribute
from simulations.runner import validate_data
from simulations.small_site import small_site_results
from simulations.summary import paired_against
from tests.simulations.test_simulations import DIABETES_BOUNDS

SIZES = [42, 100, 300]  # diabetes has 442 rows
NAMES = ["small", "mid", "big"]


def skewed_study(absent: dict[str, list[str]] | None = None, **study: Any) -> dict[str, Any]:
    """Diabetes dealt into sites of exactly 42, 100 and 300 rows; 30% masking at ``small``."""
    ds: dict[str, Any] = {"name": "diab", "builtin": "diabetes",
                          "partition": {"kind": "size_skew", "rows": SIZES,
                                        "site_names": NAMES}}
    if absent is not None:
        ds["absent"] = absent
    return {
        "study": {"name": "skew", "methods": ["local", "centralized", "federated", "hybrid"],
                  "epsilons": [math.inf], "seeds": [0, 1], **study},
        "missingness": {"mechanism": "one_attribute", "rate": 0.05,
                        "site_rates": {"small": 0.3}},
        "datasets": [ds], "bounds": DIABETES_BOUNDS,
    }


# -- exact sizes and per-site rates -------------------------------------------------------
def test_size_skew_deals_exact_row_counts() -> None:
    for seed in (0, 4):
        parts = partition_rows(450, "size_skew", seed, rows=[50, 100, 300])
        assert [len(p) for p in parts] == [50, 100, 300]
        perm = np.random.default_rng(10_000 + seed).permutation(450)  # the same shuffle
        np.testing.assert_array_equal(np.concatenate(parts), perm)
    with pytest.raises(ValueError, match="rows: the counts sum to 449 but the dataset has 450"):
        partition_rows(450, "size_skew", 0, rows=[49, 100, 300])
    fed = make_federation(study_from_dict(skewed_study()), 0, seed=1)
    assert fed.site_names == NAMES and [len(x) for x in fed.sites] == SIZES


def test_site_rates_override_the_rate_of_the_named_sites() -> None:
    rng = np.random.default_rng(5)
    sites = [rng.normal(size=(n, 4)) for n in (60, 200, 120)]
    cfg = MissingnessConfig(rate=0.05, site_rates={"b": 0.25})
    for seed in (0, 1):
        masks = apply_missingness(sites, list("wxyz"), cfg, seed, site_names=["a", "b", "c"])
        assert [int(m.sum()) for m in masks] == [3, 50, 6]
        assert all((m.sum(axis=1) <= 1).all() for m in masks)
        # per-site rates equal to the shared one give the shared-rate masks exactly
        same = mask_one_attribute(sites, [0.05, 0.05, 0.05], seed)
        assert all(np.array_equal(a, b) for a, b in
                   zip(same, mask_one_attribute(sites, 0.05, seed), strict=True))
    with pytest.raises(ValueError, match="site_rates needs the sites' names"):
        apply_missingness(sites, list("wxyz"), cfg, 0)


# -- never-measured columns ---------------------------------------------------------------
def test_never_measured_column_is_hidden_whole_and_its_truth_kept() -> None:
    study = study_from_dict(skewed_study(absent={"small": ["bmi"]}))
    bmi = 2
    for seed in (0, 1):
        p = prepare(study, 0, seed)
        small = p.fed.sites[0]
        assert np.isnan(p.masked[0][:, bmi]).all() and p.never[0][:, bmi].all()
        assert p.never[0].sum() == len(small) and not p.never[1].any()
        assert np.isfinite(small[:, bmi]).all()           # the truth is intact
        assert not p.masks[0][:, bmi].any()               # the protocol never picks it there
        # 30% of the small site's 42 rows lose one of the columns it does measure
        assert p.masks[0].sum() == round(0.3 * 42) and p.masks[1].sum() == 5
        assert p.masks[1][:, bmi].any() or p.masks[2][:, bmi].any()


def _filled(p: Any, absent_shift: float) -> list[np.ndarray]:
    """Every hidden cell given its true value; never-measured cells the truth plus
    ``absent_shift`` column standard deviations."""
    out = []
    for x, xm, nv in zip(p.fed.sites, p.masked, p.never, strict=True):
        y = np.where(np.isnan(xm), x, xm)
        y[nv] += absent_shift * np.broadcast_to(p.sd, y.shape)[nv]
        out.append(y)
    return out


def test_never_measured_cells_are_scored_apart_against_the_truth() -> None:
    p = prepare(study_from_dict(skewed_study(absent={"small": ["bmi"]})), 0, 0)
    perfect = score(_filled(p, 0.0), p)
    assert perfect["nrmse"] == 0 and perfect["nrmse_absent"] == {"small": {"bmi": 0.0}}
    off = score(_filled(p, 1.0), p)   # one std off on every never-measured cell
    assert off["nrmse_absent"]["small"]["bmi"] == pytest.approx(1.0)
    assert off["nrmse"] == 0 and off["nrmse_site"]["small"] == 0   # not in the site's NRMSE
    assert off["n_absent"] == {"small": {"bmi": 42}}
    assert off["n_absent_unimputed"] == {"small": {"bmi": 0}}
    # one hidden cell off by 2 std: the per-(site, column) breakdown finds it
    y = _filled(p, 0.0)
    r, c = map(int, np.argwhere(p.masks[1])[0])
    y[1][r, c] += 2 * p.sd[c]
    cols = score(y, p)["nrmse_site_column"]["mid"]
    col = p.fed.columns[c]
    assert cols[col] == pytest.approx(2 / math.sqrt(p.masks[1][:, c].sum()))
    assert all(v in (0.0, None) for k, v in cols.items() if k != col)
    # a method that leaves them empty gets None (and the count), not a failure
    y[0][p.never[0]] = np.nan
    empty = score(y, p)
    assert empty["nrmse_absent"]["small"]["bmi"] is None
    assert empty["n_absent_unimputed"]["small"]["bmi"] == 42


def test_local_cannot_impute_a_never_measured_column_but_the_others_can() -> None:
    study = study_from_dict(skewed_study(absent={"small": ["bmi"]}, seeds=[0]))
    (local,) = compute_task(Task(study, 0, 0, None, ("local",), ("k",)))
    assert local["nrmse_absent"]["small"]["bmi"] is None
    assert local["n_absent_unimputed"]["small"]["bmi"] == 42
    assert math.isfinite(local["nrmse_site"]["small"])
    (cent,) = compute_task(Task(study, 0, 0, None, ("centralized",), ("k",)))
    assert 0 < cent["nrmse_absent"]["small"]["bmi"] < 1.5


# -- config errors ------------------------------------------------------------------------
def _with(raw: dict[str, Any], where: str, **changes: Any) -> dict[str, Any]:
    """``raw`` with ``changes`` merged into one part: "partition", "missingness", "dataset"."""
    raw = json.loads(json.dumps(raw))
    target = {"partition": raw["datasets"][0]["partition"], "missingness": raw["missingness"],
              "dataset": raw["datasets"][0]}[where]
    for k, v in changes.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v
    return raw


@pytest.mark.parametrize(("where", "changes", "key"), [
    ("partition", {"sizes": [0.5, 0.5]}, "datasets[0].partition.sizes: kind = 'size_skew' "
                                         "needs exactly one of sizes"),
    ("partition", {"rows": None}, "datasets[0].partition.sizes: kind = 'size_skew' needs"),
    ("partition", {"rows": [0, 442]}, "datasets[0].partition.rows: expected at least two"),
    ("partition", {"rows": [42.0, 400.0]}, "datasets[0].partition.rows[0]: expected a valid "
                                           "integer (got 42.0)"),
    ("partition", {"rows": [42, 400], "sites": 3}, "datasets[0].partition.sites: 3 sites but "
                                                   "2 rows"),
    ("partition", {"kind": "iid", "sites": 3}, "datasets[0].partition.rows: only used with "
                                               "kind = 'size_skew'"),
    ("missingness", {"site_rates": {"small": 1.5}}, "missingness.site_rates.small: expected "
                                                    "a fraction"),
    ("missingness", {"mechanism": "mcar"}, "missingness.site_rates: only used with mechanism "
                                           "= 'one_attribute'"),
    ("dataset", {"absent": {"small": []}}, "datasets[0].absent.small: expected a non-empty"),
    ("dataset", {"absent": {"small": ["bmi", "bmi"]}}, "datasets[0].absent.small: expected a "
                                                       "non-empty list of distinct"),
])
def test_config_errors_name_the_key(where: str, changes: dict[str, Any], key: str) -> None:
    with pytest.raises(StudyConfigError) as info:
        study_from_dict(_with(skewed_study(), where, **changes), "s.toml")
    assert key in str(info.value), str(info.value)


@pytest.mark.parametrize(("where", "changes", "key"), [
    ("partition", {"rows": [42, 100, 299]}, "datasets[0] (diab).partition: rows: the counts "
                                            "sum to 441 but the dataset has 442 rows"),
    ("missingness", {"site_rates": {"tiny": 0.2}}, "missingness.site_rates.tiny: no dataset "
                                                   "has a site named 'tiny'"),
    ("dataset", {"absent": {"tiny": ["bmi"]}}, "datasets[0] (diab).absent.tiny: no site named "
                                               "'tiny' (sites: small, mid, big"),
    ("dataset", {"absent": {"small": ["bmi", "height"]}}, "datasets[0] (diab).absent.small[1]: "
                                                          "no column 'height'"),
    ("dataset", {"absent": {"small": ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4",
                                      "s5"]}}, "absent.small: a site must keep at least two"),
])
def test_errors_found_in_the_data_name_the_key(where: str, changes: dict[str, Any],
                                               key: str) -> None:
    study = study_from_dict(_with(skewed_study(), where, **changes), "s.toml")
    with pytest.raises(StudyConfigError) as info:
        validate_data(study)
    assert key in str(info.value), str(info.value)


# -- the smallest site: paired comparisons and the report ---------------------------------
def test_hybrid_is_paired_with_the_better_of_local_and_federated_per_seed() -> None:
    def rec(method: str, seed: int, nrmse: float, eps: str | None = None) -> dict[str, Any]:
        return {"dataset": "d", "method": method, "seed": seed, "epsilon": eps,
                "nrmse": nrmse}

    records = [rec("local", 0, 1.0), rec("local", 1, 2.0),
               rec("federated", 0, 0.8, "1"), rec("federated", 1, 2.5, "1"),
               rec("federated", 0, 0.1, "4"),
               rec("hybrid", 0, 0.9, "1"), rec("hybrid", 1, 1.9, "1")]
    got = paired_against(records, ["local", "federated"], ["hybrid"])["d"]["hybrid"]
    assert got["1"]["mean"] == pytest.approx(np.mean([0.9 - 0.8, 1.9 - 2.0]))
    assert got["1"]["n_seeds"] == 2 and "4" not in got   # no hybrid at ε = 4


def test_report_has_a_smallest_site_section(tmp_path: Path) -> None:
    study = study_from_dict(skewed_study(absent={"small": ["bmi"]}, epsilons=[1]))
    run = run_study(study, tmp_path, workers=1, progress=False)
    report = (tmp_path / "report.md").read_text()
    for phrase in ("## The smallest site", "### diab: site `small` (42 of 442 rows",
                   "| hybrid − local | ", "| hybrid − min(local, federated) | ",
                   "Never-measured column `bmi` at `small`", "`local` cannot fill them in",
                   "| federated ÷ centralized |", "![small_site](small_site.png)",
                   "site `small` never measures `bmi`", "at site `small`, 30%",
                   "dealt into sites of exactly 42, 100, 300 rows"):
        assert phrase in report, phrase
    assert (tmp_path / "small_site.png").read_bytes()[:4] == b"\x89PNG"
    small = json.loads((tmp_path / "results.json").read_text())["small_site"]["diab"]
    assert small == json.loads(json.dumps(small_site_results(run.records)["diab"]))
    assert small["site"] == "small" and small["n_rows"] == 42
    assert small["absent"]["bmi"]["unimputed"] == ["local"]
    hyb = [r for r in run.records if r["method"] == "hybrid"]
    assert small["summary"]["hybrid"]["1"]["nrmse_seeds"] == [
        r["nrmse_site"]["small"] for r in hyb]
    assert small["absent"]["bmi"]["summary"]["hybrid"]["1"]["nrmse_seeds"] == [
        r["nrmse_absent"]["small"]["bmi"] for r in hyb]


def test_site_gains_pair_each_site_by_seed() -> None:
    """joined - local per site, paired by seed; sites or seeds without both are left out."""
    from simulations.summary import site_gains

    def rec(method: str, seed: int, eps: str | None, a: float, b: float | None) -> dict:
        return {"dataset": "d", "method": method, "seed": seed, "epsilon": eps,
                "nrmse_site": {"a": a, "b": b}}

    records = [rec("local", 0, None, 1.0, 0.5), rec("local", 1, None, 0.8, 0.5),
               rec("hybrid", 0, "1", 0.7, None), rec("hybrid", 1, "1", 0.6, 0.4),
               rec("hybrid", 0, "4", 0.1, 0.1), rec("federated", 1, "1", 0.0, 0.0)]
    gains = site_gains(records, "1")["d"]
    assert gains["a"]["local"] == pytest.approx(0.9)
    assert gains["a"]["joined"] == pytest.approx(0.65)
    assert gains["a"]["mean"] == pytest.approx(-0.25) and gains["a"]["n_seeds"] == 2
    assert gains["a"]["se"] == pytest.approx(0.05)  # sd 0.05 * sqrt(2), over sqrt(2)
    assert gains["b"]["n_seeds"] == 1 and gains["b"]["mean"] == pytest.approx(-0.1)
