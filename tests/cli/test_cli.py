"""The ``fediim`` command line: impute end to end, failures write nothing, help, schema infer."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fediim import __version__
from fediim.cli import SUBCOMMANDS, main
from fediim.cli.impute import default_sidecar_paths
from fediim.impute.estimator import IIMImputer
from fediim.io.audit import AUDIT_FIELDS, audit_records, write_audit_jsonl
from fediim.io.schema import load_schema

COLUMNS = ["age", "chol", "bp", "hr"]


def _write_input(tmp_path: Path, n: int = 60, seed: int = 0) -> tuple[Path, list[list[str]]]:
    """A correlated table with missing cells ('' and 'NA') and varied number spellings.

    Returns the path and the data rows as the text written (header excluded).
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    X = np.column_stack([
        50 + 10 * base,
        200 + 30 * base + rng.normal(0, 5, n),
        120 - 8 * base + rng.normal(0, 3, n),
        70 + rng.normal(0, 6, n),
    ])
    spellings = [repr, lambda v: f"{v:.2f}", lambda v: f"{v:.3e}", lambda v: str(round(v))]
    rows: list[list[str]] = []
    for i in range(n):
        row = [spellings[(i + j) % len(spellings)](float(X[i, j])) for j in range(len(COLUMNS))]
        if i >= 10 and rng.random() < 0.4:
            row[int(rng.integers(len(COLUMNS)))] = "" if i % 2 else "NA"
        rows.append(row)
    rows.append(["NA", "", "", "NA"])  # nothing observed: the column-mean fallback
    path = tmp_path / "visits.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path, rows


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    return header, rows


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- impute: end to end -----------------------------------------------------------------


def test_impute_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp, written = _write_input(tmp_path)
    out = tmp_path / "out" / "visits_imputed.csv"
    assert main(["impute", str(inp), "-o", str(out)]) == 0

    flags, audit = default_sidecar_paths(out)
    assert flags.name == "visits_imputed.flags.csv"
    assert audit.name == "visits_imputed.audit.jsonl"
    for p in (out, flags, audit):
        assert p.is_file()

    missing = {
        (i, j) for i, row in enumerate(written) for j, v in enumerate(row) if v in ("", "NA")
    }
    assert len(missing) > 10

    # The table: same header and shape, observed values exactly as read, gaps filled.
    header, rows = _read(out)
    assert header == COLUMNS
    assert len(rows) == len(written)
    for i, (got, orig) in enumerate(zip(rows, written, strict=True)):
        for j, (g, o) in enumerate(zip(got, orig, strict=True)):
            assert g != "", (i, j)
            assert np.isfinite(float(g))
            if (i, j) not in missing:
                assert float(g) == float(o), (i, j, g, o)

    # Flags: one row per data row, flagged cells == missing cells, uncertainty iff imputed.
    fheader, frows = _read(flags)
    assert fheader == [f"{c}{s}" for c in COLUMNS
                       for s in ("_imputed", "_uncertainty", "_method")]
    assert len(frows) == len(written)
    flagged = set()
    for i, frow in enumerate(frows):
        for j in range(len(COLUMNS)):
            flag, unc, method = frow[3 * j:3 * j + 3]
            assert flag in ("0", "1")
            if flag == "1":
                flagged.add((i, j))
                assert float(unc) >= 0 and method in ("iim", "mean")
            else:
                assert unc == "" and method == ""
    assert flagged == missing

    # Audit: one JSON line per imputed cell, values agree with the table.
    lines = audit.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(missing)
    records = [json.loads(line) for line in lines]
    assert {(r["row"] - 1, COLUMNS.index(r["column"])) for r in records} == missing
    for r in records:
        assert list(r) == list(AUDIT_FIELDS)
        assert r["k"] == 10
        assert r["value"] == float(rows[r["row"] - 1][COLUMNS.index(r["column"])])
        assert r["uncertainty"] >= 0
        if r["method"] == "iim":
            assert r["n_candidates"] >= 1 and r["ell"] is not None
        else:
            assert r["method"] == "mean" and r["n_candidates"] == 0 and r["ell"] is None
    last = len(written)  # the all-missing row uses the column-mean fallback
    assert {r["method"] for r in records if r["row"] == last} == {"mean"}

    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{len(written)} rows" in err and f"{len(missing)} cells imputed" in err
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_impute_options(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("a,b\n1,2\n2,-999\n3,6\n4,8\n5,10\n", encoding="utf-8")
    out, flags, audit = tmp_path / "o.csv", tmp_path / "f.csv", tmp_path / "a.jsonl"
    argv = ["impute", str(inp), "-o", str(out), "--flags", str(flags), "--audit", str(audit),
            "--missing", "-999", "--k", "2", "--no-scale"]
    assert main(argv) == 0
    assert _listing(tmp_path) == ["a.jsonl", "f.csv", "in.csv", "o.csv"]
    _, rows = _read(out)
    assert rows[0] == ["1", "2"]  # integral values keep their integer spelling
    assert abs(float(rows[1][1]) - 4.0) < 1.0  # b = 2a
    (rec,) = [json.loads(line) for line in audit.read_text().splitlines()]
    assert rec["row"] == 2 and rec["column"] == "b" and rec["k"] == 2


def test_impute_with_schema(tmp_path: Path) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("a,b,c\n1,2,5\n2,,\n3,6,7\n4,8,\n5,10,9\n", encoding="utf-8")
    schema = tmp_path / "schema.toml"
    schema.write_text(
        '[columns."a"]\nbounds = [0, 10]\n'
        '[columns."b"]\nbounds = [0, 3]\n'  # imputed b (about 4) is clipped to 3
        '[columns."c"]\nbounds = [0, 10]\nimpute = false\n',
        encoding="utf-8",
    )
    out = tmp_path / "out.csv"
    assert main(["impute", str(inp), "-o", str(out), "--schema", str(schema)]) == 0
    _, rows = _read(out)
    assert rows[1][1] == "3"
    assert rows[1][2] == "" and rows[3][2] == ""  # c is not imputed
    records = [json.loads(x) for x in default_sidecar_paths(out)[1].read_text().splitlines()]
    assert [(r["row"], r["column"]) for r in records] == [(2, "b")]


# -- impute: failures leave nothing behind ----------------------------------------------


def test_bad_cell_exit_2_names_file_row_column_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "site_a.csv"
    inp.write_text("age,chol\n50,200\n61,high\n70,\n", encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["impute", str(inp), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "site_a.csv" in err and "line 3" in err and "'chol'" in err and "'high'" in err
    assert _listing(tmp_path) == ["site_a.csv"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [("", "empty file"), ("a,b\n", "no data rows"), ("a,a\n1,2\n", "duplicate")],
)
def test_other_bad_inputs_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text(text, encoding="utf-8")
    assert main(["impute", str(inp), "-o", str(tmp_path / "out.csv")]) == 2
    assert needle in capsys.readouterr().err
    assert _listing(tmp_path) == ["in.csv"]


def test_missing_input_and_bad_schema_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["impute", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    inp, _ = _write_input(tmp_path)
    bad = tmp_path / "schema.toml"
    bad.write_text('[columns."age"]\nbounds = [5, 1]\n', encoding="utf-8")
    assert main(["impute", str(inp), "-o", str(tmp_path / "o.csv"), "--schema", str(bad)]) == 2
    assert "schema.toml" in capsys.readouterr().err
    assert _listing(tmp_path) == ["schema.toml", "visits.csv"]


def test_output_paths_must_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp, _ = _write_input(tmp_path)
    before = inp.read_bytes()
    assert main(["impute", str(inp), "-o", str(inp)]) == 2
    assert main(["impute", str(inp), "-o", str(tmp_path / "o.csv"),
                 "--flags", str(tmp_path / "o.csv")]) == 2
    assert "same file" in capsys.readouterr().err
    assert inp.read_bytes() == before
    assert _listing(tmp_path) == ["visits.csv"]


def test_write_failure_leaves_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, _ = _write_input(tmp_path)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x", encoding="utf-8")
    out = tmp_path / "out.csv"
    argv = ["impute", str(inp), "-o", str(out), "--audit", str(blocker / "audit.jsonl")]
    assert main(argv) == 1
    assert "cannot write" in capsys.readouterr().err
    assert _listing(tmp_path) == ["not_a_dir", "visits.csv"]  # no table, no flags, no temp


# -- help, version, usage -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["--help"], ["impute", "--help"], ["schema", "--help"], ["schema", "infer", "--help"]]
)
def test_help_exits_0_with_description_and_example(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "usage: fediim" in text
    assert "examples:" in text and "fediim " in text.split("examples:")[1]


def test_help_explains_iim(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["impute", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Individual Models" in text and "neighbours" in text and "OUT.flags.csv" in text


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert len(SUBCOMMANDS) >= 2
    for name in ("impute", "schema"):
        assert name in top


def test_version_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fediim {__version__}"
    assert main([]) == 2
    assert main(["impute"]) == 2  # IN and -o are required
    assert main(["impute", "x.csv", "-o", "y.csv", "--k", "0"]) == 2
    assert main(["schema"]) == 2
    assert main(["frobnicate"]) == 2


def test_console_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fediim.cli", "--version"],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"fediim {__version__}"


# -- schema infer -----------------------------------------------------------------------


def test_schema_infer_writes_loadable_schema_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, written = _write_input(tmp_path)
    target = tmp_path / "schema.toml"
    assert main(["schema", "infer", str(inp), "-o", str(target)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "not differentially private" in err
    schema = load_schema(target)
    assert schema.column_names == COLUMNS
    for j, name in enumerate(COLUMNS):
        vals = [float(r[j]) for r in written if r[j] not in ("", "NA")]
        assert schema.column(name).bounds == (min(vals), max(vals))
    assert "WARNING" in target.read_text(encoding="utf-8")
    # The schema it writes is accepted by impute.
    assert main(["impute", str(inp), "-o", str(tmp_path / "o.csv"), "--schema", str(target)]) == 0


def test_schema_infer_options_and_bad_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.csv"
    inp.write_text("a,b\n0,-1\n10,5\n-1,7\n", encoding="utf-8")
    target = tmp_path / "s.toml"
    argv = ["schema", "infer", str(inp), "-o", str(target), "--margin", "0.1", "--missing", "-1"]
    assert main(argv) == 0
    schema = load_schema(target)
    assert schema.missing == ["-1"]
    assert schema.column("a").bounds == (-1.0, 11.0)  # 0..10 widened by 10% each side
    inp.write_text("a,b\n0,x\n", encoding="utf-8")
    target.unlink()
    assert main(["schema", "infer", str(inp), "-o", str(target)]) == 2
    assert "'x'" in capsys.readouterr().err
    assert not target.exists()


# -- audit module -----------------------------------------------------------------------


def test_audit_records_and_jsonl(tmp_path: Path) -> None:
    X = np.array([[1.0, 2.0], [2.0, np.nan], [3.0, 6.0], [np.nan, 8.0], [5.0, 10.0]])
    result = IIMImputer(n_neighbors=2).fit(X).impute(X)
    recs = list(audit_records(result, ["a", "b"], k=2, row_offset=0))
    assert [(r["row"], r["column"]) for r in recs] == [(1, "b"), (3, "a")]
    path = tmp_path / "audit.jsonl"
    assert write_audit_jsonl(path, recs) == 2
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs
    with pytest.raises(ValueError, match="column names"):
        list(audit_records(result, ["a"], k=2))
