"""Schema loading, validation messages, hashing and the TOML round trip."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from fediim.io.schema import (
    DEFAULT_MISSING,
    ColumnSpec,
    SchemaError,
    TableSchema,
    infer_schema,
    load_schema,
)

EXAMPLE = """\
missing = ["", "NA", "?"]
[columns."age"]
bounds = [0, 120]
missing = ["-1"]
impute = true
[columns."chol"]
bounds = [0, 700]
missing = ["0"]
"""


def _write(tmp_path: Path, text: str, name: str = "schema.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _error(tmp_path: Path, text: str) -> str:
    p = _write(tmp_path, text, "bad_schema.toml")
    with pytest.raises(SchemaError) as info:
        load_schema(p)
    msg = str(info.value)
    assert "bad_schema.toml" in msg
    return msg


def test_load_example(tmp_path: Path) -> None:
    s = load_schema(_write(tmp_path, EXAMPLE))
    assert s.column_names == ["age", "chol"]
    assert s.missing == ["", "NA", "?"]
    assert s.columns[0] == ColumnSpec(name="age", bounds=(0.0, 120.0), missing=["-1"])
    assert s.columns[1].impute is True and s.columns[1].kind == "numeric"
    np.testing.assert_array_equal(s.bounds_array(), [[0, 120], [0, 700]])
    assert s.bounds_array().dtype == np.float64
    assert s.markers_for("age") == {"", "NA", "?", "-1"}
    assert s.markers_for("chol") == {"", "NA", "?", "0"}


def test_column_order_is_file_order(tmp_path: Path) -> None:
    text = '[columns."z"]\nbounds = [0, 1]\n[columns."a"]\nbounds = [0, 1]\n'
    text += '[columns."m"]\nbounds = [0, 1]\n'
    assert load_schema(_write(tmp_path, text)).column_names == ["z", "a", "m"]


def test_default_missing_markers(tmp_path: Path) -> None:
    s = load_schema(_write(tmp_path, '[columns."a"]\nbounds = [0, 1]\n'))
    assert s.missing == list(DEFAULT_MISSING)
    assert s.markers_for("a") == {"", "NA", "NaN", "nan", "?"}


def test_markers_for_unknown_column() -> None:
    s = TableSchema(columns=[ColumnSpec(name="a", bounds=(0, 1))])
    with pytest.raises(SchemaError, match="unknown column 'b'"):
        s.markers_for("b")


def test_toml_round_trip(tmp_path: Path) -> None:
    s = load_schema(_write(tmp_path, EXAMPLE))
    s2 = load_schema(_write(tmp_path, s.to_toml(), "again.toml"))
    assert s2 == s
    assert s2.schema_hash() == s.schema_hash()


def test_toml_round_trip_awkward_values(tmp_path: Path) -> None:
    s = TableSchema(
        missing=["", 'q"uote', "back\\slash", "tab\t", "ünï"],
        columns=[
            ColumnSpec(name='we"ird name\n', bounds=(-1.5e-7, 3.25e300), missing=["-999"]),
            ColumnSpec(name="no bounds", impute=False),
            ColumnSpec(name="x.y", bounds=(-(2.0**60), 0.1)),
        ],
    )
    again = load_schema(_write(tmp_path, s.to_toml()))
    assert again == s


def test_hash_ignores_formatting(tmp_path: Path) -> None:
    a = load_schema(_write(tmp_path, EXAMPLE, "a.toml"))
    reformatted = """
# same schema, different layout
missing = [ "?", "", "NA" ]

[columns]
"age" = { bounds = [0.0, 120.0], missing = ["-1"] }
chol = { missing = ["0"], bounds = [0e0, 7e2], impute = true, kind = "numeric" }
"""
    b = load_schema(_write(tmp_path, reformatted, "b.toml"))
    assert a.schema_hash() == b.schema_hash()
    assert len(a.schema_hash()) == 64
    changed = load_schema(_write(tmp_path, EXAMPLE.replace("120", "121"), "c.toml"))
    assert changed.schema_hash() != a.schema_hash()
    reordered = '[columns."chol"]\nbounds = [0, 700]\nmissing = ["0"]\n'
    reordered += '[columns."age"]\nbounds = [0, 120]\nmissing = ["-1"]\n'
    reordered = 'missing = ["", "NA", "?"]\n' + reordered
    assert load_schema(_write(tmp_path, reordered, "d.toml")).schema_hash() != a.schema_hash()


def test_error_lo_not_below_hi(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[columns."age"]\nbounds = [120, 0]\n')
    assert 'columns."age".bounds' in msg and "lo < hi" in msg


def test_error_equal_bounds(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[columns."age"]\nbounds = [5, 5]\n')
    assert 'columns."age".bounds' in msg and "lo < hi" in msg


def test_error_non_finite_bounds(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[columns."age"]\nbounds = [0, inf]\n')
    assert 'columns."age".bounds' in msg and "finite" in msg
    msg = _error(tmp_path, '[columns."age"]\nbounds = [nan, 1]\n')
    assert 'columns."age".bounds' in msg and "finite" in msg


@pytest.mark.parametrize("bounds", ["[0, 1, 2]", "[1]", '"0-120"', '["0", 1]', "[true, 2]"])
def test_error_malformed_bounds(tmp_path: Path, bounds: str) -> None:
    msg = _error(tmp_path, f'[columns."age"]\nbounds = {bounds}\n')
    assert 'columns."age".bounds' in msg and "[lo, hi]" in msg


def test_error_unknown_column_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[columns."age"]\nbounds = [0, 1]\nbound = [0, 2]\n')
    assert 'columns."age".bound' in msg and "unknown key" in msg and "bounds" in msg


def test_error_name_key_in_column(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[columns."age"]\nname = "age"\n')
    assert 'columns."age".name' in msg and "unknown key" in msg


def test_error_unknown_top_level_key(tmp_path: Path) -> None:
    msg = _error(tmp_path, 'colums = 1\n[columns."a"]\nbounds = [0, 1]\n')
    assert "'colums'" in msg and "unknown key" in msg


def test_error_wrong_types(tmp_path: Path) -> None:
    text = 'missing = "NA"\n[columns."a"]\nbounds = [0, 1]\nimpute = "yes"\nmissing = [-1]\n'
    text += 'kind = "nominal"\n'
    msg = _error(tmp_path, text)
    assert 'columns."a".impute: expected true or false' in msg
    assert 'columns."a".missing[0]: expected a string' in msg
    assert ('columns."a".kind: expected kind = "numeric", "binary", "categorical" or '
            '"ordinal"') in msg
    assert "missing: expected a list" in msg
    assert "4 schema errors" in msg


def test_error_no_columns(tmp_path: Path) -> None:
    assert "at least one" in _error(tmp_path, 'missing = ["NA"]\n')
    assert "at least one column" in _error(tmp_path, "[columns]\n")
    assert "expected tables" in _error(tmp_path, "columns = 3\n")
    assert "expected a table" in _error(tmp_path, "[columns]\nage = 3\n")


def test_error_bad_toml(tmp_path: Path) -> None:
    msg = _error(tmp_path, '[columns."age"\nbounds = [0, 1]\n')
    assert "invalid TOML" in msg and "line 1" in msg
    msg = _error(tmp_path, '[columns."a"]\nbounds = [0, 1]\n[columns."a"]\nbounds = [0, 2]\n')
    assert "invalid TOML" in msg


def test_error_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bad_schema.toml"
    p.write_bytes(b'[columns."\xff"]\nbounds = [0, 1]\n')
    with pytest.raises(SchemaError, match="bad_schema.toml"):
        load_schema(p)


def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"nope\.toml: schema file not found"):
        load_schema(tmp_path / "nope.toml")


def test_duplicate_names_rejected() -> None:
    # TOML itself forbids duplicate tables; programmatic construction is checked too.
    with pytest.raises(ValueError, match=r"unique column names, got duplicates \['a'\]"):
        TableSchema(columns=[ColumnSpec(name="a"), ColumnSpec(name="a")])


def test_bounds_array_names_columns_without_bounds(tmp_path: Path) -> None:
    s = load_schema(
        _write(tmp_path, '[columns."a"]\nbounds = [0, 1]\n[columns."b"]\n[columns."c"]\n')
    )
    with pytest.raises(SchemaError, match=r"\['b', 'c'\] have no bounds"):
        s.bounds_array()


def test_infer_schema_warns_and_bounds() -> None:
    X = np.array([[1.0, 5.0, 7.0], [3.0, np.nan, 7.0], [np.nan, 9.0, 7.0]])
    with pytest.warns(UserWarning, match="not differentially private"):
        s = infer_schema(X, ["a", "b", "c"])
    assert s.column_names == ["a", "b", "c"]
    np.testing.assert_allclose(s.bounds_array(), [[1, 3], [5, 9], [3.5, 10.5]])
    with pytest.warns(UserWarning):
        s2 = infer_schema(X, ["a", "b", "c"], margin=0.5)
    np.testing.assert_allclose(s2.bounds_array()[:2], [[0, 4], [3, 11]])


def test_infer_schema_errors() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SchemaError, match=r"\['b'\] have no observed values"):
            infer_schema(np.array([[1.0, np.nan], [2.0, np.nan]]), ["a", "b"])
        with pytest.raises(SchemaError, match=r"\['a'\] contain inf"):
            infer_schema(np.array([[np.inf, 1.0]]), ["a", "b"])
        with pytest.raises(SchemaError, match="expected 2 column names"):
            infer_schema(np.zeros((2, 2)), ["a"])
        with pytest.raises(SchemaError, match="margin"):
            infer_schema(np.zeros((2, 1)), ["a"], margin=-1)
