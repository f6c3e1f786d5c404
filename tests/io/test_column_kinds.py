"""Coded column kinds in the schema (declared levels, TOML round trip, hash), reading
labels as level codes, writing them back, and the kinds ``schema infer`` proposes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from fediim.errors import DataError
from fediim.io.audit import audit_records
from fediim.io.outputs import write_flags, write_table
from fediim.io.result import ImputationResult
from fediim.io.schema import SchemaError, TableSchema, load_schema, propose_kinds
from fediim.io.table import read_csv

MIXED = """\
[columns."age"]
bounds = [0, 120]
[columns."sex"]
kind = "binary"
levels = ["female", "male"]
[columns."cp"]
kind = "categorical"
levels = [1, 2, 3, 4]
[columns."grade"]
kind = "ordinal"
levels = ["low", "mid", "high"]
"""


def _schema(tmp_path: Path, text: str = MIXED) -> TableSchema:
    path = tmp_path / "schema.toml"
    path.write_text(text, encoding="utf-8")
    return load_schema(path)


def test_kinds_and_levels_round_trip_through_toml(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    assert [c.kind for c in schema.columns] == ["numeric", "binary", "categorical", "ordinal"]
    assert schema.column("cp").levels == (1.0, 2.0, 3.0, 4.0)
    assert schema.column("sex").levels == ("female", "male")
    again = _schema(tmp_path, schema.to_toml())
    assert again == schema and again.schema_hash() == schema.schema_hash()
    assert "levels = [1, 2, 3, 4]" in schema.to_toml()
    assert schema.bounds_array().tolist() == [[0, 120], [0, 1], [0, 3], [0, 2]]
    assert schema.code_kinds() == {1: ("binary", (0.0, 1.0)),
                                   2: ("categorical", (0.0, 1.0, 2.0, 3.0)),
                                   3: ("ordinal", (0.0, 1.0, 2.0))}


def test_a_numeric_schema_keeps_its_hash() -> None:
    """Levels enter the canonical form only for coded columns: the hash of a numeric
    schema (pinned by every signed bank) is what it was."""
    schema = TableSchema.from_dict({"columns": {"age": {"bounds": [0, 120]}}})
    assert "levels" not in json.loads(schema.canonical_json())["columns"][0]
    assert schema.canonical_json() == (
        '{"columns":[{"bounds":[0.0,120.0],"impute":true,"kind":"numeric","missing":[],'
        '"name":"age"}],"format":1,"missing":["","?","NA","NaN","nan"]}')


@pytest.mark.parametrize(("spec", "message"), [
    ('kind = "binary"\nlevels = [1, 2, 3]', 'columns."x": kind = "binary" expects exactly 2'),
    ('kind = "categorical"', 'columns."x": kind = "categorical" needs levels'),
    ("levels = [1, 2]", 'columns."x": levels are declared only for kind'),
    ('kind = "nominal"\nlevels = [1, 2]', 'columns."x".kind: expected kind = "numeric"'),
    ('kind = "ordinal"\nlevels = [1, 1]', 'columns."x".levels: expected distinct levels'),
    ('kind = "ordinal"\nlevels = "ab"', 'columns."x".levels: expected levels = [...]'),
    ('kind = "binary"\nlevels = [0, 1]\nbounds = [0, 1]', "a coded column takes no bounds"),
    ('kind = "binary"\nlevels = [0, true]', "strings or finite numbers"),
])
def test_bad_kinds_name_the_file_and_column(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(SchemaError) as info:
        _schema(tmp_path, f'[columns."x"]\n{spec}\n')
    assert "schema.toml" in str(info.value) and message in str(info.value)


def test_labels_are_read_as_codes_and_written_back(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    data = tmp_path / "t.csv"
    data.write_text("age,sex,cp,grade\n63.0,male,1.0,low\n41, female ,4,\n50,,2,high\n",
                    encoding="utf-8")
    table = read_csv(data, schema=schema)
    assert table.values[:, 1:].tolist()[0] == [1.0, 0.0, 0.0]
    assert np.isnan(table.values[1, 3]) and np.isnan(table.values[2, 1])
    out = io.StringIO()
    write_table(out, table.values, table.columns, schema)
    assert out.getvalue().splitlines() == ["age,sex,cp,grade", "63,male,1,low",
                                           "41,female,4,", "50,,2,high"]


def test_an_undeclared_label_names_file_row_column_and_levels(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    data = tmp_path / "t.csv"
    data.write_text("age,sex,cp,grade\n63,male,1,low\n41,other,4,mid\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_csv(data, schema=schema)
    text = str(info.value)
    assert "t.csv" in text and "line 3" in text and "sex" in text
    assert "'other' is not a declared level" in text and "['female', 'male']" in text
    data.write_text("age,sex,cp,grade\n63,male,5,low\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'5' is not a declared level; expected one of the "
                                        r"levels \[1, 2, 3, 4\]"):
        read_csv(data, schema=schema)


def test_flags_and_audit_carry_the_level_and_its_probability(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    values = np.array([[50.0, 1.0, 2.0, 0.0], [60.0, 0.0, 3.0, 2.0]])
    imputed = np.array([[False, True, True, False], [True, False, False, True]])
    result = ImputationResult(
        values=values, imputed=imputed, uncertainty=np.where(imputed, 0.25, np.nan),
        method=np.where(imputed, "iim", "").astype(object), ell=np.full((2, 4), 3.0),
        n_candidates=np.full((2, 4), 10), probability=np.where(imputed, 0.75, np.nan))
    flags = io.StringIO()
    write_flags(flags, result, schema.column_names, schema)
    header, first, _ = flags.getvalue().splitlines()
    assert header.split(",")[3:7] == ["sex_imputed", "sex_uncertainty", "sex_method",
                                      "sex_probability"]
    assert "grade_probability" not in header and first.split(",")[3:7] == ["1", "0.25", "iim",
                                                                          "0.75"]
    records = list(audit_records(result, schema.column_names, k=10,
                                 levels=schema.column_levels()))
    by_column = {record["column"]: record for record in records}
    assert by_column["sex"]["value"] == "male" and by_column["sex"]["probability"] == 0.75
    assert by_column["cp"]["value"] == 3.0 and by_column["grade"]["value"] == "high"
    assert "probability" not in by_column["age"]


def test_propose_kinds_few_whole_numbers_or_text() -> None:
    proposed = propose_kinds(
        ["age", "sex", "cp", "smoker", "dose"],
        [["63", "41.5", "50"], ["0", "1", "1.0", "0"], ["1", "2", "3", "4"] * 2,
         ["yes", "no"], [str(v) for v in range(12)] * 3])
    # Whole numbers that do not repeat, or a single label, stay as they are.
    assert propose_kinds(["a", "b"], [["0", "10"], ["x", "x"]]) == {}
    assert proposed == {"sex": ("binary", (0.0, 1.0)),
                        "cp": ("categorical", (1.0, 2.0, 3.0, 4.0)),
                        "smoker": ("binary", ("no", "yes"))}
