"""``fediim impute --multiple M``: M drawn tables beside the usual outputs, all or none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fediim.cli import main
from fediim.cli.impute import multiple_paths
from fediim.io.table import read_csv
from tests.cli.test_cli import _listing, _write_input


def test_multiple_writes_m_drawn_tables_with_observed_cells_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp, _ = _write_input(tmp_path)
    out = tmp_path / "visits_imputed.csv"
    assert main(["impute", str(inp), "-o", str(out), "--multiple", "3", "--seed", "5"]) == 0
    paths = multiple_paths(out, 3)
    assert [path.name for path in paths] == [f"visits_imputed.imp{n}.csv" for n in (1, 2, 3)]
    source = read_csv(inp).values
    single = read_csv(out).values
    observed = ~np.isnan(source)
    drawn = [read_csv(path) for path in paths]
    for table in drawn:
        assert table.columns == read_csv(out).columns
        assert np.array_equal(table.values[observed], source[observed])
        assert np.all(np.isfinite(table.values))
    holes = ~observed
    assert not np.allclose(drawn[0].values[holes], drawn[1].values[holes])
    assert not np.allclose(drawn[0].values[holes], single[holes])
    assert "3 drawn tables" in capsys.readouterr().err
    # The same seed draws the same tables.
    again = tmp_path / "again.csv"
    assert main(["impute", str(inp), "-o", str(again), "--multiple", "3", "--seed", "5"]) == 0
    assert multiple_paths(again, 3)[2].read_bytes() == paths[2].read_bytes()


def test_multiple_applies_the_schema_to_every_draw(tmp_path: Path) -> None:
    inp, _ = _write_input(tmp_path)
    schema = tmp_path / "schema.toml"
    schema.write_text('[columns."age"]\n[columns."chol"]\nbounds = [190, 210]\n'
                      '[columns."bp"]\n[columns."hr"]\nimpute = false\n', encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["impute", str(inp), "-o", str(out), "--schema", str(schema),
                 "--multiple", "2", "--seed", "0"]) == 0
    source = read_csv(inp).values
    for path in multiple_paths(out, 2):
        values = read_csv(path).values
        filled = np.isnan(source[:, 1])
        assert np.all((values[filled, 1] >= 190) & (values[filled, 1] <= 210))
        assert np.array_equal(np.isnan(values[:, 3]), np.isnan(source[:, 3]))


@pytest.mark.parametrize(("extra", "needle"), [
    (["--multiple", "1"], ">= 2"),
    (["--seed", "3"], "--seed needs --multiple"),
    (["--multiple", "2", "--seed", "-1"], "--seed needs --multiple"),
])
def test_bad_multiple_options_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            extra: list[str], needle: str) -> None:
    inp, _ = _write_input(tmp_path)
    assert main(["impute", str(inp), "-o", str(tmp_path / "o.csv"), *extra]) == 2
    assert needle in capsys.readouterr().err
    assert _listing(tmp_path) == ["visits.csv"]


def test_a_drawn_table_cannot_overwrite_another_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp, _ = _write_input(tmp_path)
    out = tmp_path / "o.csv"
    assert main(["impute", str(inp), "-o", str(out), "--multiple", "2",
                 "--audit", str(tmp_path / "o.imp2.csv")]) == 2
    assert "same file" in capsys.readouterr().err
    assert _listing(tmp_path) == ["visits.csv"]


def test_write_failure_leaves_no_drawn_table(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    inp, _ = _write_input(tmp_path)
    out = tmp_path / "o.csv"
    (tmp_path / "o.imp2.csv").mkdir()  # the second drawn table cannot be written
    assert main(["impute", str(inp), "-o", str(out), "--multiple", "2"]) == 1
    assert "none of them was written" in capsys.readouterr().err
    assert _listing(tmp_path) == ["o.imp2.csv", "visits.csv"]

