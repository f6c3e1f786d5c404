"""Data loading: every failure names file, row and column; no silent coercion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd  # noqa: E402  (a dev dependency)
import pytest

from fediim.io.schema import ColumnSpec, TableSchema
from fediim.io.table import DataError, Table, as_matrix, read_csv, write_csv


def _csv(tmp_path: Path, text: str, name: str = "site_a.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _fails(path: Path, **kwargs: object) -> DataError:
    with pytest.raises(DataError) as info:
        read_csv(path, **kwargs)  # type: ignore[arg-type]
    assert path.name in str(info.value)
    return info.value


SCHEMA = TableSchema(
    missing=["", "NA"],
    columns=[
        ColumnSpec(name="age", bounds=(0, 120), missing=["-1"]),
        ColumnSpec(name="chol", bounds=(0, 700), missing=["0"]),
    ],
)


# -- read_csv: happy paths --------------------------------------------------------------


def test_read_basic(tmp_path: Path) -> None:
    t = read_csv(_csv(tmp_path, "a, b ,c\n1,2.5,-3e2\n NA ,?,\n4,.5,+6.\n"))
    assert isinstance(t, Table)
    assert t.columns == ["a", "b", "c"]
    assert (t.n_rows, t.n_cols) == (3, 3)
    np.testing.assert_array_equal(t.values, [[1, 2.5, -300], [np.nan] * 3, [4, 0.5, 6]])
    np.testing.assert_array_equal(t.missing_mask[1], [True, True, True])
    assert not t.missing_mask[0].any()
    assert t.values.dtype == np.float64
    assert t.source.endswith("site_a.csv")


def test_read_bom_quotes_crlf_trailing_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "win.csv"
    p.write_bytes(b'\xef\xbb\xbf"a","b,c"\r\n"1","NA"\r\n2,3\r\n\r\n\r\n')
    t = read_csv(p)
    assert t.columns == ["a", "b,c"]
    np.testing.assert_array_equal(t.values, [[1, np.nan], [2, 3]])


def test_read_with_schema_markers(tmp_path: Path) -> None:
    t = read_csv(_csv(tmp_path, "age,chol\n-1,0\n50,200\n0,-1\n"), schema=SCHEMA)
    # -1 is missing only for age, 0 only for chol
    np.testing.assert_array_equal(t.values, [[np.nan, np.nan], [50, 200], [0, -1]])


def test_missing_markers_argument_overrides_defaults(tmp_path: Path) -> None:
    p = _csv(tmp_path, "a,b\n1,.\n2,3\n")
    t = read_csv(p, missing_markers=["."])
    np.testing.assert_array_equal(t.values, [[1, np.nan], [2, 3]])
    err = _fails(p)  # "." is not a default marker
    assert "line 2" in str(err) and "column 'b'" in str(err)


def test_nan_literal_is_missing_by_default(tmp_path: Path) -> None:
    t = read_csv(_csv(tmp_path, "a,b\n1,nan\n2,NaN\n3,4\n"))
    assert np.isnan(t.values[:2, 1]).all()


# -- read_csv: errors -------------------------------------------------------------------


def test_error_file_not_found(tmp_path: Path) -> None:
    err = _fails(tmp_path / "missing_site.csv")
    assert "file not found" in str(err)


def test_error_empty_file(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, ""))
    assert "empty file" in str(err) and "header" in str(err)


def test_error_header_only(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "a,b\n"))
    assert "no data rows" in str(err)


def test_error_duplicate_column(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "age,chol,age\n1,2,3\n"))
    msg = str(err)
    assert "line 1" in msg and "column 'age'" in msg and "duplicate" in msg
    assert "fields 1 and 3" in msg
    assert (err.row, err.column) == (1, "age")


def test_error_empty_column_name(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "age,,chol\n1,2,3\n"))
    assert "line 1" in str(err) and "header field 2 is empty" in str(err)


def test_error_ragged_row(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "a,b,c\n1,2,3\n4,5,6\n7,8\n"))
    msg = str(err)
    assert "line 4" in msg and "row has 2 fields, expected 3" in msg
    assert err.row == 4
    err = _fails(_csv(tmp_path, "a,b\n1,2,3\n"))
    assert "line 2" in str(err) and "3 fields, expected 2" in str(err)


def test_error_blank_line_inside_data(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "a,b\n1,2\n\n3,4\n"))
    assert "line 3" in str(err) and "blank line" in str(err)


def test_error_non_numeric_cell(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "age,chol\n40,200\n41,210\nabc,220\n"))
    msg = str(err)
    assert "line 4" in msg and "column 'age'" in msg and "'abc'" in msg
    assert "expected a number or a missing marker" in msg
    assert (err.row, err.column) == (4, "age")


@pytest.mark.parametrize("cell", ["1_000", "0x10", "1,5", "١٢", "12abc", "--1", "1e", "e5"])
def test_error_numbers_python_would_coerce_or_garbage(tmp_path: Path, cell: str) -> None:
    err = _fails(_csv(tmp_path, f'x,y\n1,2\n3,"{cell}"\n'))
    assert "line 3" in str(err) and "column 'y'" in str(err) and "not a number" in str(err)


@pytest.mark.parametrize("cell", ["inf", "-inf", "Infinity", "+INF"])
def test_error_infinite_literal(tmp_path: Path, cell: str) -> None:
    err = _fails(_csv(tmp_path, f"x,y\n{cell},2\n"))
    msg = str(err)
    assert "line 2" in msg and "column 'x'" in msg and "not finite" in msg


def test_error_overflow(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "x,y\n1e999,2\n"))
    assert "line 2" in str(err) and "column 'x'" in str(err) and "finite" in str(err)


def test_error_nan_literal_not_declared(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "x,y\n1,2\n3,nan\n"), missing_markers=["NA"])
    msg = str(err)
    assert "line 3" in msg and "column 'y'" in msg and "not a declared missing marker" in msg


def test_error_entirely_missing_column(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "age,chol,bmi\n1,,NA\n2,NA,?\n"))
    msg = str(err)
    assert "'chol'" in msg and "'bmi'" in msg and "no observed values" in msg
    err = _fails(_csv(tmp_path, "age,chol\n1,NA\n2,\n"))
    assert "column 'chol'" in str(err) and err.column == "chol"


def test_error_malformed_quoting(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, 'a,b\n1,2\n3,"4"x\n'))
    assert "line 3" in str(err) and "malformed CSV" in str(err)


def test_error_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.csv"
    p.write_bytes(b"a,b\n1,2\n3,\xe9\n")
    err = _fails(p)
    assert "line 3" in str(err) and "UTF-8" in str(err)


def test_error_schema_header_mismatch(tmp_path: Path) -> None:
    err = _fails(_csv(tmp_path, "age,bmi\n1,2\n"), schema=SCHEMA)
    msg = str(err)
    assert "line 1" in msg and "missing columns ['chol']" in msg
    assert "unexpected columns ['bmi']" in msg
    err = _fails(_csv(tmp_path, "chol,age\n1,2\n"), schema=SCHEMA)
    assert "different order" in str(err) and "['age', 'chol']" in str(err)


def test_error_schema_column_marker_not_global(tmp_path: Path) -> None:
    # "0" is a marker for chol only; "?" is not a marker in SCHEMA at all.
    err = _fails(_csv(tmp_path, "age,chol\n1,2\n3,?\n"), schema=SCHEMA)
    assert "line 3" in str(err) and "column 'chol'" in str(err)


# -- write_csv round trip ---------------------------------------------------------------


def test_write_read_round_trip(tmp_path: Path) -> None:
    values = np.array([[1.5, np.nan, -3.0], [0.1, 2e-7, np.nan], [123456.789, 0.0, 7.0]])
    cols = ["a", "b, with comma", 'c "quoted"']
    p = tmp_path / "out" / "imputed.csv"
    write_csv(p, values, cols)
    t = read_csv(p)
    assert t.columns == cols
    np.testing.assert_array_equal(t.values, values)  # 10 significant digits suffice here
    np.testing.assert_array_equal(t.missing_mask, np.isnan(values))


def test_write_exact_repr_and_single_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 1))
    values[2, 0] = np.nan
    p = tmp_path / "one.csv"
    write_csv(p, values, ["only"], float_format=None)
    np.testing.assert_array_equal(read_csv(p).values, values)  # bit-exact with repr


def test_write_rejects_inf_and_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "keep.csv"
    p.write_text("old\n")
    with pytest.raises(DataError) as info:
        write_csv(p, [[1.0, 2.0], [3.0, np.inf]], ["a", "b"])
    msg = str(info.value)
    assert "keep.csv" in msg and "row 2" in msg and "column 'b'" in msg
    assert p.read_text() == "old\n"
    with pytest.raises(DataError, match="shape"):
        write_csv(p, [[1.0, 2.0]], ["a"])


# -- as_matrix --------------------------------------------------------------------------


def test_as_matrix_array_and_list() -> None:
    X = np.array([[1, 2], [3, 4]], dtype=np.int32)
    values, cols, index = as_matrix(X)
    assert values.dtype == np.float64 and cols == ["x0", "x1"] and index is None
    values[0, 0] = 99
    assert X[0, 0] == 1  # a copy
    f = np.array([[1.0, np.nan]])
    out, _, _ = as_matrix(f, columns=["a", "b"])
    assert out is not f
    values, cols, _ = as_matrix([[1, None], [2.5, float("nan")]], columns=["a", "b"])
    np.testing.assert_array_equal(values, [[1, np.nan], [2.5, np.nan]])
    assert cols == ["a", "b"]


def test_as_matrix_object_array() -> None:
    X = np.array([[1, None], [np.float32(2), 3]], dtype=object)
    np.testing.assert_array_equal(as_matrix(X)[0], [[1, np.nan], [2, 3]])


def test_as_matrix_dataframe() -> None:
    df = pd.DataFrame(
        {
            "age": pd.array([40, None, 60], dtype="Int64"),
            "chol": [200.0, np.nan, 180.0],
            "obj": pd.Series([1, None, pd.NA], dtype=object, index=["p1", "p2", "p3"]),
        },
        index=["p1", "p2", "p3"],
    )
    values, cols, index = as_matrix(df)
    assert cols == ["age", "chol", "obj"]
    assert list(index) == ["p1", "p2", "p3"]
    np.testing.assert_array_equal(
        values, [[40, 200, 1], [np.nan, np.nan, np.nan], [60, 180, np.nan]]
    )


def test_as_matrix_error_non_numeric_array() -> None:
    with pytest.raises(DataError) as info:
        as_matrix([[1, 2], [3, "abc"]], columns=["a", "b"])
    msg = str(info.value)
    assert "<array>" in msg and "row 2" in msg and "column 'b'" in msg and "'abc'" in msg
    assert (info.value.row, info.value.column) == (2, "b")
    with pytest.raises(DataError, match=r"row 1 .*column 'x0'.*'1\.5'"):
        as_matrix(np.array([["1.5", "2"]]))  # strings are never parsed


def test_as_matrix_error_non_numeric_dataframe() -> None:
    df = pd.DataFrame({"age": [1.0, 2.0], "sex": ["m", "f"]}, index=["p1", "p2"])
    with pytest.raises(DataError) as info:
        as_matrix(df)
    msg = str(info.value)
    assert "<array>" in msg and "row 1" in msg and "'p1'" in msg and "column 'sex'" in msg
    with pytest.raises(DataError, match="column 'flag'.*boolean"):
        as_matrix(pd.DataFrame({"flag": [True, False]}))
    with pytest.raises(DataError, match="differ from the DataFrame's columns"):
        as_matrix(df[["age"]], columns=["x"])


def test_as_matrix_error_inf() -> None:
    with pytest.raises(DataError) as info:
        as_matrix(np.array([[1.0, 2.0], [3.0, -np.inf]]))
    msg = str(info.value)
    assert "row 2" in msg and "column 'x1'" in msg and "not finite" in msg
    with pytest.raises(DataError, match=r"row 2 \(index label 'q'\), column 'a'"):
        as_matrix(pd.DataFrame({"a": [1.0, np.inf]}, index=["p", "q"]))


def test_as_matrix_error_booleans() -> None:
    # np.array([[1, True]]) would silently give [[1, 1]]; lists are checked cell by cell.
    with pytest.raises(DataError, match="boolean"):
        as_matrix(np.array([[True, False]]))
    with pytest.raises(DataError, match=r"row 1 .*column 'x1'.*boolean True"):
        as_matrix([[1, True]])


@pytest.mark.parametrize(
    ("X", "expected"),
    [
        (np.array([1.0, 2.0]), "expected a 2-D table"),
        (np.zeros((2, 2, 2)), "expected a 2-D table"),
        (np.zeros((0, 3)), "at least one row and one column"),
        (np.zeros((3, 0)), "at least one row and one column"),
        ([[1, 2], [3]], "different lengths"),
        ([], "expected a 2-D table"),
    ],
)
def test_as_matrix_error_shapes(X: object, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        as_matrix(X)


def test_as_matrix_error_column_names() -> None:
    with pytest.raises(DataError, match="expected 2"):
        as_matrix(np.zeros((1, 2)), columns=["a"])
    with pytest.raises(DataError, match="column 'a'.*duplicate"):
        as_matrix(np.zeros((1, 2)), columns=["a", "a"])




def test_values_whose_spread_overflows_are_a_data_error_naming_the_column(tmp_path) -> None:
    """Finding 10: ±1e308 gave overflow warnings and imputations with uncertainty 0."""
    path = tmp_path / "big.csv"
    path.write_text("a,b\n1,1e308\n2,-1e308\n3,\n4,5\n")
    with pytest.raises(DataError, match=r"column 'b'.*overflows") as err:
        read_csv(path)
    assert err.value.column == "b" and err.value.source == str(path)
    path.write_text("a,b\n1,1e100\n2,-1e100\n3,\n4,5\n")
    assert read_csv(path).values.shape == (4, 2)  # large but representable
    with pytest.raises(DataError, match="overflows"):
        as_matrix(np.array([[1.0, 1e308], [2.0, -1e308]]))


def test_table_shape_check() -> None:
    with pytest.raises(ValueError, match="expected values of shape"):
        Table(values=np.zeros((2, 3)), columns=["a", "b"])


def test_entirely_missing_column_allowed_when_asked(tmp_path: Path) -> None:
    table = read_csv(_csv(tmp_path, "age,chol\n1,NA\n2,\n"), allow_empty_columns=True)
    assert table.columns == ["age", "chol"]
    assert np.isnan(table.values[:, 1]).all() and table.values[:, 0].tolist() == [1.0, 2.0]
