"""A mixed-type CSV (text labels, coded numbers, an ordinal, numerics) through
``fediim schema infer`` and ``fediim impute``: every imputed coded cell a declared level,
observed cells as they were, flags and audit with the level's probability."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fediim.cli import main
from fediim.io.schema import load_schema

SCHEMA = """\
[columns]
age = { bounds = [0, 120] }
sex = { kind = "binary", levels = ["female", "male"] }
cp = { kind = "categorical", levels = [1, 2, 3, 4] }
pressure = { bounds = [50, 250] }
grade = { kind = "ordinal", levels = ["low", "mid", "high"] }
"""


def _mixed_csv(path: Path, n: int = 160, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        age = rng.uniform(25, 85)
        cp = int(np.clip((age - 25) // 15 + 1, 1, 4))
        rows.append([f"{age:.1f}", str(rng.choice(["female", "male"])), f"{cp}.0",
                     f"{90 + age + rng.normal(0, 5):.1f}",
                     ["low", "mid", "high"][min(2, int((age - 25) // 20))]])
    masked = [[("" if rng.random() < 0.12 and j else cell) for j, cell in enumerate(row)]
              for row in rows]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["age", "sex", "cp", "pressure", "grade"])
        writer.writerows(masked)
    return masked


def test_impute_writes_levels_flags_and_audit(tmp_path: Path) -> None:
    data, schema = tmp_path / "mixed.csv", tmp_path / "schema.toml"
    written = _mixed_csv(data)
    schema.write_text(SCHEMA, encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["impute", str(data), "-o", str(out), "--schema", str(schema)]) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    levels = {"sex": {"female", "male"}, "cp": {"1", "2", "3", "4"},
              "grade": {"low", "mid", "high"}}
    for before, after in zip(written, rows, strict=True):
        for name, old, new in zip(header, before, after, strict=True):
            assert new != ""
            if name in levels:
                assert new in levels[name]
                if old:  # an observed label as it was (the code 2.0 written as 2)
                    assert new == old.removesuffix(".0")
            elif old:
                assert float(new) == float(old)
    with open(tmp_path / "out.flags.csv", newline="", encoding="utf-8") as fh:
        flags = list(csv.DictReader(fh))
    assert "grade_probability" not in flags[0] and "age_probability" not in flags[0]
    imputed_sex = [row for row in flags if row["sex_imputed"] == "1"]
    assert imputed_sex
    for row in imputed_sex:
        probability = float(row["sex_probability"])
        assert 0.5 <= probability <= 1.0
        assert float(row["sex_uncertainty"]) == pytest.approx(1 - probability, abs=1e-5)
    records = [json.loads(line) for line in
               (tmp_path / "out.audit.jsonl").read_text(encoding="utf-8").splitlines()]
    cp = [r for r in records if r["column"] == "cp"]
    assert cp and all(r["value"] in (1.0, 2.0, 3.0, 4.0) and r["probability"] > 0 for r in cp)
    assert all(r["value"] in ("low", "mid", "high") for r in records if r["column"] == "grade")


def test_an_undeclared_label_writes_nothing(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data, schema = tmp_path / "mixed.csv", tmp_path / "schema.toml"
    _mixed_csv(data, n=20)
    text = data.read_text(encoding="utf-8").splitlines()
    cells = text[3].split(",")
    cells[1] = "unknown"
    text[3] = ",".join(cells)
    data.write_text("\n".join(text) + "\n", encoding="utf-8")
    schema.write_text(SCHEMA, encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["impute", str(data), "-o", str(out), "--schema", str(schema)]) != 0
    err = capsys.readouterr().err
    assert "mixed.csv" in err and "line 4" in err and "sex" in err
    assert "'unknown' is not a declared level" in err
    assert not out.exists()


def test_schema_infer_proposes_kinds_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "mixed.csv"
    _mixed_csv(data, n=80)
    target = tmp_path / "schema.toml"
    assert main(["schema", "infer", str(data), "-o", str(target)]) == 0
    err = capsys.readouterr().err
    assert "column 'sex' looks binary" in err and "column 'cp' looks categorical" in err
    assert "confirm the kind" in err
    schema = load_schema(target)
    assert schema.column("sex").levels == ("female", "male")
    assert schema.column("cp").kind == "categorical"
    assert schema.column("grade").levels == ("high", "low", "mid")  # sorted: confirm order
    assert schema.column("age").kind == "numeric" and schema.column("age").bounds is not None
    assert "bounds and levels below were read from" in target.read_text(encoding="utf-8")
    # The proposed schema is accepted by impute.
    assert main(["impute", str(data), "-o", str(tmp_path / "o.csv"), "--schema",
                 str(target)]) == 0


def test_multiple_writes_m_tables_of_declared_labels(tmp_path: Path) -> None:
    """``--multiple 3`` with coded columns: three tables, every coded cell a declared
    label (written as the single table writes it), observed cells as they were, the drawn
    levels differing between tables; the same seed draws the same tables."""
    data, schema = tmp_path / "mixed.csv", tmp_path / "schema.toml"
    written = _mixed_csv(data, n=120)
    schema.write_text(SCHEMA, encoding="utf-8")
    out = tmp_path / "out.csv"
    arguments = ["impute", str(data), "-o", str(out), "--schema", str(schema),
                 "--multiple", "3", "--seed", "1"]
    assert main(arguments) == 0
    levels = {"sex": {"female", "male"}, "cp": {"1", "2", "3", "4"},
              "grade": {"low", "mid", "high"}}
    drawn = []
    for number in (1, 2, 3):
        with open(tmp_path / f"out.imp{number}.csv", newline="", encoding="utf-8") as fh:
            header, *rows = list(csv.reader(fh))
        for before, after in zip(written, rows, strict=True):
            for name, old, new in zip(header, before, after, strict=True):
                assert new != ""
                if name in levels:
                    assert new in levels[name]
                if old:
                    assert new == old.removesuffix(".0") if name in levels else (
                        float(new) == float(old))
        drawn.append([[row[j] for j in (1, 2, 4)] for row, before in
                      zip(rows, written, strict=True) if "" in (before[1], before[2], before[4])])
    assert drawn[0] != drawn[1] and drawn[1] != drawn[2]
    first = (tmp_path / "out.imp2.csv").read_bytes()
    assert main([*arguments[:3], str(tmp_path / "again.csv"), *arguments[4:]]) == 0
    assert (tmp_path / "again.imp2.csv").read_bytes() == first
