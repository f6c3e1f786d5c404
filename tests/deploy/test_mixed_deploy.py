"""Integration: a mixed-type CSV (text labels, coded numbers, an ordinal) through a real
``fediim local-deploy`` (TLS SuperLink, three SuperNodes): every site's imputed table keeps
its observed cells as they were, labels included, and fills every coded gap with a
declared level, with its voted probability in the flags; the audit names the levels.

The sites release the one-hot encoding of ``FederatedIIM(column_kinds=...)``
(tests/apps/test_flower_coded.py checks the bank bit for bit), each its own cells or, with
secure aggregation (the default "auto" from 3 sites), summed over the sites. The secure
run is slow (~2.5-3 min of a real deployment under load): ``pytest -m slow``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fediim.cli import main
from fediim.deploy.supervisor import stray_processes
from tests.cli.test_mixed_csv import SCHEMA as MIXED_SCHEMA
from tests.paths import missing

SITES = ("north", "south", "east")
BIN = Path(sys.executable).parent
SCHEMA = 'missing = [""]\n' + MIXED_SCHEMA
LEVELS = {"sex": {"female", "male"}, "cp": {"1", "2", "3", "4"},
          "grade": {"low", "mid", "high"}}


def _site_csv(path: Path, n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        age = rng.uniform(25, 85)
        cells = [f"{age:.1f}", str(rng.choice(["female", "male"])),
                 str(int(np.clip((age - 25) // 15 + 1, 1, 4))),
                 f"{90 + age + rng.normal(0, 5):.1f}",
                 ["low", "mid", "high"][min(2, int((age - 25) // 20))]]
        rows.append([("" if j and rng.random() < 0.06 else cell)
                     for j, cell in enumerate(cells)])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["age", "sex", "cp", "pressure", "grade"])
        writer.writerows(rows)
    return rows


@pytest.fixture(scope="module", params=["per-site",
                                        pytest.param("auto", marks=pytest.mark.slow)])
def deployed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, dict[str, list], int, str, str]:
    if not (BIN / "flower-superlink").exists() and not shutil.which("flower-superlink"):
        missing("flower-superlink is not installed")
    tmp = tmp_path_factory.mktemp("mixed")
    (tmp / "schema.toml").write_text(SCHEMA, encoding="utf-8")
    written, args = {}, ["local-deploy", "--schema", str(tmp / "schema.toml"), "--out",
                         str(tmp / "fed"), "--epsilon", "4", "--timeout", "600",
                         "--aggregation", request.param]
    for number, name in enumerate(SITES):
        written[name] = _site_csv(tmp / f"{name}.csv", 150, number)
        args += ["--data", str(tmp / f"{name}.csv")]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(args)
    return tmp / "fed", written, code, stderr.getvalue(), request.param


def test_mixed_csv_through_local_deploy(
        deployed: tuple[Path, dict[str, list], int, str, str]) -> None:
    out, written, code, stderr, aggregation = deployed
    deploy = json.loads((out / "logs" / "deploy.json").read_text())
    assert stray_processes(deploy["marker"]) == []
    assert code == 0, stderr
    view = json.loads((out / "coordinator" / "federation.json").read_text())
    assert view["aggregation"] == ("per-site" if aggregation == "per-site" else "secure")
    if aggregation == "auto":  # 3 sites: secure, every cell a sum over them
        assert view["bank"]["sites"] == ["federation"]
        assert view["secure"]["columns"]["onehot_blocks"] == [[1], [2, 3, 4, 5]]
    else:
        assert view["bank"]["sites"] == sorted(SITES)
    for name in SITES:
        with open(out / name / "imputed.csv", newline="", encoding="utf-8") as fh:
            header, *rows = list(csv.reader(fh))
        assert len(rows) == len(written[name])
        for before, after in zip(written[name], rows, strict=True):
            for column, old, new in zip(header, before, after, strict=True):
                assert new != ""
                if column in LEVELS:
                    assert new in LEVELS[column]
                    assert not old or new == old
                elif old:
                    assert float(new) == float(old)
        with open(out / name / "flags.csv", newline="", encoding="utf-8") as fh:
            flags = list(csv.DictReader(fh))
        assert "sex_probability" in flags[0] and "grade_probability" not in flags[0]
        for column in ("sex", "cp"):
            voted = [float(row[f"{column}_probability"]) for row in flags
                     if row[f"{column}_imputed"] == "1"]
            assert voted and all(0 < p <= 1 for p in voted), column
        assert all(row["cp_probability"] == "" for row in flags if row["cp_imputed"] == "0")
        records = [json.loads(line) for line in
                   (out / name / "audit.jsonl").read_text().splitlines()]
        assert records and all(r["value"] in ("low", "mid", "high")
                               for r in records if r["column"] == "grade")
        assert all(r["value"] in ("female", "male") for r in records if r["column"] == "sex")
