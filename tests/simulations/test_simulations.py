"""Studies: TOML validation, data/partitions, missingness mechanisms, resume, outputs, CLI."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fediim.cli import main as fediim_main
from simulations import StudyConfigError, load_study, run_study, study_from_dict
from simulations.baselines import impute_table
from simulations.config import MissingnessConfig
from simulations.data import make_federation, partition_rows
from simulations.methods import Task, compute_task
from simulations.missingness import apply_missingness, mask_one_attribute, mask_pooled
from simulations.runner import validate_data
from simulations.summary import paired_differences
from tests.paths import DATASETS, REPO, require_file

DIABETES_BOUNDS = {"age": [0, 120], "sex": [1, 2], "bmi": [10, 70], "bp": [40, 200],
                   "s1": [50, 500], "s2": [0, 400], "s3": [0, 150], "s4": [0, 15],
                   "s5": [2, 8], "s6": [40, 300]}


def small_study(**study: Any) -> dict[str, Any]:
    """A quick diabetes study as a dict (each part overridable)."""
    return {
        "study": {"name": "small", "methods": ["local", "mean", "federated", "federated_mean"],
                  "epsilons": [1, math.inf], "seeds": [0, 1], **study},
        "missingness": {"mechanism": "one_attribute", "rate": 0.1},
        "datasets": [{"name": "diab", "builtin": "diabetes",
                      "partition": {"kind": "iid", "sites": 3}}],
        "bounds": DIABETES_BOUNDS,
    }


# -- validation: errors name the key -----------------------------------------------------
BASE_TOML = """\
[study]
name = "t"
methods = ["local", "federated"]
epsilons = [1, inf]

[[datasets]]
name = "d"
builtin = "diabetes"
[datasets.partition]
kind = "iid"
sites = 2

[bounds]
age = [0, 120]
"""


@pytest.mark.parametrize(("old", "new", "key"), [
    ('name = "t"', 'name = "t"\ncolour = "red"', "study.colour: unknown key"),
    ('methods = ["local", "federated"]', 'methods = ["local", "bogus"]',
     "study.methods[1]: unknown method 'bogus'"),
    ("epsilons = [1, inf]", "epsilons = [1, 0]", "study.epsilons[1]"),
    ("epsilons = [1, inf]", "", "study.epsilons: required by the private method"),
    ('methods = ["local", "federated"]\n', "", "study.methods: required key is missing"),
    ("sites = 2", "", "datasets[0].partition.sites: required for kind = 'iid'"),
    ('kind = "iid"', 'kind = "roundrobin"', "datasets[0].partition.kind"),
    ("age = [0, 120]", "age = [120, 0]", "bounds.age: expected [lo, hi]"),
    ('builtin = "diabetes"', 'builtin = "diabetes"\npath = "x.csv"', "datasets[0].path"),
    ("[bounds]", "[missingness]\nrate = 1.5\n[bounds]", "missingness.rate"),
    ("[bounds]", '[missingness]\nmechanism = "mar"\n[bounds]', "missingness.driver: required"),
    ("[bounds]", '[missingness]\nmechanism = "mnar"\nstrength = -1\n[bounds]',
     "missingness.strength"),
])
def test_toml_errors_name_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in BASE_TOML
    p = tmp_path / "s.toml"
    p.write_text(BASE_TOML.replace(old, new, 1))
    with pytest.raises(StudyConfigError) as info:
        load_study(p)
    msg = str(info.value)
    assert str(p) in msg and key in msg, msg


@pytest.mark.parametrize(("old", "new", "key"), [
    ("age = [0, 120]", "age = [0, 120]\nweight = [0, 300]", None),  # extra bound: fine
    ("[bounds]", "[missingness]\nmechanism = \"mar\"\ndriver = \"height\"\n[bounds]",
     "missingness.driver: no column 'height'"),
    ("sites = 2", "sites = 2\n[datasets.bounds]\nheight = [0, 3]",
     "datasets[0] (d).bounds.height: no such column"),
])
def test_errors_that_need_the_data_name_the_key(tmp_path: Path, old: str, new: str,
                                                key: str | None) -> None:
    p = tmp_path / "s.toml"
    p.write_text(BASE_TOML.replace(old, new, 1))
    study = load_study(p)
    with pytest.raises(StudyConfigError) as info:
        validate_data(study)
    msg = str(info.value)
    if key is None:  # the remaining problem is the missing bounds, named as such
        assert "bounds: no public bounds for column(s) 'sex', 'bmi'" in msg
        assert "domain knowledge" in msg
    else:
        assert key in msg, msg


def test_bounds_required_only_by_private_methods(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text(BASE_TOML)
    with pytest.raises(StudyConfigError, match=r"bounds: no public bounds .* private method"):
        validate_data(load_study(p))
    p.write_text(BASE_TOML.replace('["local", "federated"]', '["local", "knn"]'))
    validate_data(load_study(p))  # non-private methods need no bounds


def test_bad_toml_and_missing_files(tmp_path: Path) -> None:
    p = tmp_path / "s.toml"
    p.write_text("[study\nname = 1")
    with pytest.raises(StudyConfigError, match="not valid TOML"):
        load_study(p)
    with pytest.raises(StudyConfigError, match="no such study file"):
        load_study(tmp_path / "absent.toml")
    p.write_text(BASE_TOML.replace('builtin = "diabetes"', 'path = "nowhere/x.csv"'))
    with pytest.raises(StudyConfigError, match=r"datasets\[0\] \(d\)\.path: 'nowhere/x.csv' "
                                                r"not found"):
        validate_data(load_study(p))


def test_cli_reports_bad_study_with_exit_2(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.toml"
    p.write_text(BASE_TOML.replace("sites = 2", "sites = 1"))
    assert fediim_main(["study", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "datasets[0].partition.sites" in err and "greater than or equal to 2" in err
    assert not (tmp_path / "o").exists()


# -- data, paths and partitions ----------------------------------------------------------
def _write_csv(path: Path, header: list[str], rows: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if np.isnan(v) else repr(float(v)) for v in r])


def test_relative_paths_resolve_from_the_project_root(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "studies" / "deep").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    rng = np.random.default_rng(0)
    _write_csv(root / "data" / "t.csv", ["a", "b", "c"], rng.normal(size=(40, 3)))
    text = textwrap.dedent("""\
        [study]
        name = "p"
        methods = ["mean"]
        [[datasets]]
        name = "t"
        path = "data/t.csv"
        [datasets.partition]
        kind = "iid"
        sites = 2
        """)
    (root / "studies" / "deep" / "s.toml").write_text(text)
    study = load_study(root / "studies" / "deep" / "s.toml")
    assert study.base_dir == root.resolve()
    validate_data(study)
    # base_dir overrides, relative to the TOML's folder
    (root / "studies" / "b.toml").write_text(text.replace('name = "p"',
                                                          'name = "p"\nbase_dir = ".."'))
    assert load_study(root / "studies" / "b.toml").base_dir == root.resolve()
    # without a pyproject.toml above it, the TOML's own folder
    other = tmp_path / "loose"
    other.mkdir()
    (other / "s.toml").write_text(text)
    assert load_study(other / "s.toml").base_dir == other.resolve()


def test_folder_of_site_csvs_and_natural_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 3))
    _write_csv(tmp_path / "sites" / "b_second.csv", ["u", "v", "w"], x[:10])
    _write_csv(tmp_path / "sites" / "a_first.csv", ["u", "v", "w"], x[10:])
    raw = {"study": {"name": "f", "methods": ["mean"]},
           "datasets": [{"name": "f", "path": "sites", "missing_codes": {"w": [0.0]}}]}
    fed = make_federation(study_from_dict(raw, base_dir=tmp_path), 0, seed=0)
    assert fed.site_names == ["a_first", "b_second"]
    np.testing.assert_array_equal(fed.sites[1], x[:10])

    hosp = np.repeat([1.0, 2.0, 3.0], 10)[:, None]
    _write_csv(tmp_path / "one.csv", ["u", "v", "w", "hospital"], np.hstack([x, hosp]))
    raw["datasets"] = [{"name": "g", "path": "one.csv",
                        "partition": {"kind": "natural", "column": "hospital"}}]
    fed = make_federation(study_from_dict(raw, base_dir=tmp_path), 0, seed=0)
    assert fed.columns == ["u", "v", "w"]
    assert fed.site_names == ["hospital=1", "hospital=2", "hospital=3"]
    np.testing.assert_array_equal(fed.sites[2], x[20:])


def test_partitioners() -> None:
    n = 1000
    for seed in (0, 3):  # a default_rng(10_000 + seed) permutation cut in 4
        got = partition_rows(n, "iid", seed, sites=4)
        want = np.array_split(np.random.default_rng(10_000 + seed).permutation(n), 4)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    col = np.random.default_rng(0).normal(size=n)
    blocks = partition_rows(n, "sorted", 0, sites=4, column=col)
    assert max(col[blocks[0]]) <= min(col[blocks[1]])
    sizes = [len(i) for i in partition_rows(n, "size_skew", 0, sizes=[4, 3, 2, 1])]
    assert sizes == [400, 300, 200, 100]
    label = np.repeat([0.0, 1.0, 2.0], [500, 300, 200])
    parts = partition_rows(n, "dirichlet", 0, sites=4, column=label, alpha=0.3, min_rows=20)
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    assert min(len(p) for p in parts) >= 20
    shares = np.array([[np.mean(label[p] == c) for c in (0, 1, 2)] for p in parts])
    assert np.ptp(shares[:, 0]) > 0.3  # the label mix differs strongly between sites
    with pytest.raises(ValueError, match="min_rows"):
        partition_rows(30, "dirichlet", 0, sites=4, column=label[:30], min_rows=10)


# -- missingness mechanisms --------------------------------------------------------------
def _logit_z(m: np.ndarray, X: np.ndarray) -> np.ndarray:
    """z statistics of a logistic regression of ``m`` on ``[1, X]`` (Newton / IRLS)."""
    A = np.column_stack([np.ones(len(m)), X])
    beta = np.zeros(A.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-A @ beta))
        H = A.T @ (A * (p * (1 - p))[:, None])
        step = np.linalg.solve(H, A.T @ (m - p))
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    se = np.sqrt(np.diag(np.linalg.inv(H)))
    return beta[1:] / se[1:]


def _correlated(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=n)
    y = 0.8 * d + 0.6 * rng.normal(size=n)
    other = rng.normal(size=n)
    return np.column_stack([d, y, other])


def test_mar_depends_on_the_driver_not_on_the_value() -> None:
    x = _correlated(40_000, seed=7)
    mask = mask_pooled(x, "mar", 0.3, np.random.default_rng(11), targets=[1, 2], driver=0,
                       strength=1.5)
    m = mask[:, 1].astype(float)
    assert not mask[:, 0].any()                       # the driver is always observed
    assert abs(m.mean() - 0.3) < 0.01
    r, p = stats.pearsonr(m, x[:, 0])
    assert r > 0.3 and p < 1e-50                      # missingness follows the driver
    z_driver, z_value = _logit_z(m, x[:, :2])
    assert z_driver > 50
    assert abs(z_value) < 3                           # ... and given it, not the value
    # the same test does detect value dependence (MNAR on the same column)
    mnar = mask_pooled(x, "mnar", 0.3, np.random.default_rng(11), targets=[1], strength=1.5)
    assert abs(_logit_z(mnar[:, 1].astype(float), x[:, :2])[1]) > 20


def test_mnar_hides_the_larger_values() -> None:
    x = _correlated(40_000, seed=3)
    mask = mask_pooled(x, "mnar", 0.25, np.random.default_rng(5), targets=[0, 1, 2],
                       strength=1.0)
    for j in range(3):
        hidden, seen = x[mask[:, j], j], x[~mask[:, j], j]
        assert abs(mask[:, j].mean() - 0.25) < 0.01
        t, p = stats.ttest_ind(hidden, seen, equal_var=False)
        assert t > 0 and p < 1e-100, (j, t, p)
        assert hidden.mean() - seen.mean() > 0.5      # in std units: a large shift
    # MCAR on the same data: no such difference
    mcar = mask_pooled(x, "mcar", 0.25, np.random.default_rng(5), targets=[0, 1, 2])
    for j in range(3):
        assert stats.ttest_ind(x[mcar[:, j], j], x[~mcar[:, j], j], equal_var=False)[1] > 0.01


def test_masks_never_blank_a_row_and_respect_real_gaps() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3))
    x[rng.random(x.shape) < 0.2] = np.nan
    x[np.isnan(x).all(axis=1), 0] = 1.0
    for mech in ("mcar", "mnar"):
        mask = mask_pooled(x, mech, 0.6, np.random.default_rng(1), targets=[0, 1, 2])
        assert not (mask & np.isnan(x)).any()
        assert ((~np.isnan(x)) & ~mask).any(axis=1).all()
    sites = [x[:200], x[200:]]
    cfg = MissingnessConfig(mechanism="mar", rate=0.2, driver="a", columns=["b"])
    masks = apply_missingness(sites, ["a", "b", "c"], cfg, seed=0)
    assert [mk.shape for mk in masks] == [(200, 3), (300, 3)]
    assert not masks[0][:, [0, 2]].any() and masks[1][:, 1].any()


def test_one_attribute_protocol() -> None:
    """Per site, round(rate x complete rows) complete rows lose one observed attribute each;
    a column the site never observes neither counts against "complete" nor is hidden."""
    rng = np.random.default_rng(2)
    sites = [rng.normal(size=(n, 4)) for n in (120, 80, 45)]
    sites[1][rng.random((80, 4)) < 0.1] = np.nan
    sites[2][:, 3] = np.nan                    # a column this site never observes
    for seed in (0, 1):
        masks = mask_one_attribute(sites, 0.05, seed)
        for x, mk in zip(sites, masks, strict=True):
            seen = ~np.isnan(x).all(axis=0)
            complete = ~np.isnan(x[:, seen]).any(axis=1)
            assert mk.sum() == round(0.05 * complete.sum())
            assert (mk.sum(axis=1) <= 1).all() and complete[mk.any(axis=1)].all()
            assert not mk[:, ~seen].any()
        again = mask_one_attribute(sites, 0.05, seed)
        assert all(np.array_equal(a, b) for a, b in zip(masks, again, strict=True))
    assert masks[2].sum() == 2  # 45 complete rows over the three observed columns


def test_baselines_keep_observed_cells_and_unseen_columns() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 4))
    x[rng.random((60, 4)) < 0.1] = np.nan
    x[:, 3] = np.nan                           # never observed: nothing to learn it from
    for method in ("iim", "knn", "mean", "mice", "missforest"):
        out = impute_table(method, x, k=5, seed=0)
        observed = ~np.isnan(x)
        np.testing.assert_array_equal(out.values[observed], x[observed])
        assert np.isfinite(out.values[:, :3]).all() and np.isnan(out.values[:, 3]).all()
    mice = impute_table("mice", x, seed=0).diagnostics
    assert mice["n_iter"] >= 1 and isinstance(mice["warnings"], list)


def test_paired_differences_pair_by_seed() -> None:
    def rec(method: str, seed: int, nrmse: float, eps: str | None = None) -> dict[str, Any]:
        return {"dataset": "d", "method": method, "seed": seed, "epsilon": eps,
                "nrmse": nrmse}

    records = [rec("local", 0, 1.0), rec("local", 1, 2.0), rec("local", 2, 3.0),
               rec("hybrid", 0, 0.9, "1"), rec("hybrid", 1, 2.0, "1"),
               rec("hybrid", 2, 2.8, "1"), rec("federated", 0, 1.5, "inf")]
    paired = paired_differences(records)["d"]
    hybrid = paired["hybrid"]["1"]
    diffs = [-0.1, 0.0, -0.2]  # paired by seed, although the seeds' levels differ by 1
    assert hybrid["mean"] == pytest.approx(np.mean(diffs))
    assert hybrid["se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(3))
    assert hybrid["n_seeds"] == 3 and hybrid["within_noise"]
    one = paired["federated"]["inf"]
    assert one["n_seeds"] == 1 and one["se"] == math.inf and one["within_noise"]
    assert paired_differences([r for r in records if r["method"] != "local"]) == {}


def test_study_replace_narrows_and_revalidates() -> None:
    study = study_from_dict(small_study(), base_dir=REPO)
    quick = study.replace(seeds=[0], epsilons=[math.inf], methods=["local", "federated"])
    s = quick.config.study
    assert (s.seeds, s.epsilons, s.methods) == ([0], [math.inf], ["local", "federated"])
    assert quick.base_dir == study.base_dir and quick.config.bounds == study.config.bounds
    with pytest.raises(StudyConfigError, match="unknown method 'nope'"):
        study.replace(methods=["nope"])
    with pytest.raises(StudyConfigError, match="no dataset named 'other'"):
        study.replace(datasets=["other"])


# -- running: resume, failures, outputs ---------------------------------------------------
class Interrupt:
    """A compute function that counts the cells it computes and is 'killed' after N tasks."""

    def __init__(self, after_tasks: int | None = None) -> None:
        self.after, self.tasks, self.cells = after_tasks, 0, 0

    def __call__(self, task: Task) -> list[dict[str, Any]]:
        if self.after is not None and self.tasks >= self.after:
            raise KeyboardInterrupt
        self.tasks += 1
        self.cells += len(task.methods)
        return compute_task(task)


def test_interrupted_study_resumes_without_recomputing(tmp_path: Path) -> None:
    study = study_from_dict(small_study())
    n_cells = 2 * (2 + 2 * 2)  # seeds x (local, mean + 2 epsilons x 2 private methods)
    first = Interrupt(after_tasks=5)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, tmp_path / "out", workers=1, progress=False, compute=first)
    cached = list((tmp_path / "out" / "cache").glob("*.json"))
    assert len(cached) == first.cells > 0
    assert not (tmp_path / "out" / "report.md").exists()

    second = Interrupt()
    run = run_study(study, tmp_path / "out", workers=1, progress=False, compute=second,
                    write=False)
    assert second.cells == n_cells - first.cells          # finished cells were not redone
    assert (run.n_cells, run.n_cached, run.n_computed) == (n_cells, first.cells, second.cells)
    assert len(run.records) == n_cells and not run.failures

    third = Interrupt()
    again = run_study(study, tmp_path / "out", workers=1, progress=False, compute=third,
                      write=False)
    assert third.cells == 0 and again.n_cached == n_cells
    assert [r["nrmse"] for r in again.records] == [r["nrmse"] for r in run.records]

    # the resumed numbers are those of an uninterrupted run
    fresh = run_study(study, tmp_path / "fresh", workers=1, progress=False, write=False)
    assert [r["nrmse"] for r in fresh.records] == [r["nrmse"] for r in run.records]

    # a new seed or method only computes the new cells
    more = study_from_dict(small_study(seeds=[0, 1, 2]))
    fourth = Interrupt()
    run_study(more, tmp_path / "out", workers=1, progress=False, compute=fourth, write=False)
    assert fourth.cells == n_cells // 2


def test_failed_cells_are_reported_and_retried(tmp_path: Path) -> None:
    study = study_from_dict(small_study(seeds=[0]))

    def flaky(task: Task) -> list[dict[str, Any]]:
        if "mean" in task.methods:
            raise ValueError("disk on fire")
        return compute_task(task)

    run = run_study(study, tmp_path, workers=1, progress=False, compute=flaky)
    assert len(run.failures) == 1 and "disk on fire" in run.failures[0]["error"]
    assert len(run.records) == run.n_cells - 1
    assert "disk on fire" in (tmp_path / "report.md").read_text()
    counter = Interrupt()
    rerun = run_study(study, tmp_path, workers=1, progress=False, compute=counter, write=False)
    assert counter.cells == 1 and not rerun.failures


def test_cli_study_end_to_end_on_two_workers(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent("""\
        [study]
        name = "e2e"
        methods = ["local", "federated", "mean"]
        epsilons = [2]
        seeds = [0, 1]
        [missingness]
        mechanism = "mcar"
        rate = 0.05
        [[datasets]]
        name = "diab"
        builtin = "diabetes"
        [datasets.partition]
        kind = "size_skew"
        sizes = [0.6, 0.4]
        """) + "[bounds]\n" + "\n".join(f"{k} = {v}" for k, v in DIABETES_BOUNDS.items()))
    out = tmp_path / "out"
    assert fediim_main(["study", str(p), "--out", str(out), "--workers", "2",
                        "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "6 cells (6 computed, 0 from cache)" in err
    names = {f.name for f in out.iterdir()}
    assert {"report.md", "results.json", "results.csv", "nrmse_vs_epsilon.png", "per_site.png",
            "privacy_spent.png", "cache"} <= names
    for png in ("nrmse_vs_epsilon.png", "per_site.png", "privacy_spent.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text())
    assert doc["cells"] == {"total": 6, "cached": 0, "computed": 6, "failed": 0}
    fed = [r for r in doc["records"] if r["method"] == "federated"]
    assert len(fed) == 2 and all(0 < r["privacy_site"]["site0"]["epsilon_spent"] <= 2
                                 for r in fed)
    assert doc["summary"]["diab"]["mean"]["-"]["n_seeds"] == 2
    assert doc["paired_vs_local"]["diab"]["federated"]["2"]["n_seeds"] == 2
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 * 3 and {r["site"] for r in rows} == {"ALL", "site0", "site1"}
    report = (out / "report.md").read_text()
    for phrase in ("## What was run", "MCAR", "as bad as filling in the column mean",
                   "| federated |", "## Privacy spent", "![nrmse](nrmse_vs_epsilon.png)",
                   "Paired by seed", "| method − local | ε=2 |",
                   "fediim study"):
        assert phrase in report, phrase
    # rerun: everything comes from the cache
    assert fediim_main(["study", str(p), "--out", str(out), "--no-progress"]) == 0
    assert "(0 computed, 6 from cache)" in capsys.readouterr().err


# -- the shipped studies -----------------------------------------------------------------
STUDIES = sorted((REPO / "simulations" / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_are_valid(path: Path) -> None:
    study = load_study(path)
    assert study.base_dir == REPO
    uses_shared = any(d.path for d in study.config.datasets)
    if uses_shared:
        require_file(DATASETS)
    validate_data(study)
