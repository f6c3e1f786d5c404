"""The small-site benchmark's sweep design: every cell once, paired summaries."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.paths import REPO, benchmark_script

BENCH = REPO / "benchmarks"


@pytest.fixture
def small_site(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))
    return benchmark_script(monkeypatch, "small_site.py", "small_site_bench")


def test_sweep_masks_every_complete_cell_once_two_rows_at_a_time(small_site: Any) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    x[:, 4] = np.nan                       # a column the site never observes
    x[rng.random((30, 5)) < 0.1] = np.nan  # incomplete rows are never scored
    complete = np.flatnonzero(~np.isnan(x[:, :4]).any(axis=1))
    batches = small_site.sweep_batches(x)
    cells = [c for b in batches for c in b]
    assert sorted(cells) == [(int(i), j) for i in complete for j in range(4)]
    assert all(len(b) == 2 and b[0][0] != b[1][0] for b in batches[:-1])
    assert batches == small_site.sweep_batches(x)  # one fixed pairing for every bank


def test_sweep_summary_pairs_cells_and_banks(small_site: Any) -> None:
    local = {"local": [1.0, 1.0, 2.0]}
    banks = [{"eps": "4", "hybrid": [0.0, 1.0, 2.0], "hybrid_nofed": [1.0, 1.0, 2.0]},
             {"eps": "4", "hybrid": [1.0, 1.0, 0.0], "hybrid_nofed": [1.0, 1.0, 2.0]}]
    s = small_site.summarise_sweep(local, banks)["4"]
    assert s["n_cells"] == 3 and s["n_banks"] == 2
    d = s["mse_hybrid_minus_hybrid_nofed"]
    # per cell, averaged over banks: (-0.5, 0, -2); per bank: -1/3, -4/3
    assert d["mean"] == pytest.approx(-2.5 / 3)
    assert d["se"] == pytest.approx(np.std([-0.5, 0, -2], ddof=1) / np.sqrt(3))
    assert d["per_bank"] == pytest.approx([-1 / 3, -4 / 3])
    assert s["nrmse"]["local"] == pytest.approx(np.sqrt(2.0))


def test_bank_sites_leave_the_small_site_out_and_may_unite_the_others(
        small_site: Any) -> None:
    """The small site releases nothing (its release would hold the sweep's hidden cells,
    and the hybrid reads the whole bank); the others release each or as one."""
    tables = [np.full((n, 2), float(n)) for n in (5, 2, 7)]
    names = ["a", "b", "c"]
    apart, ids = small_site.bank_sites(tables, names, 1, merge_others=False)
    assert ids == ["a", "c"]
    assert apart[0] is tables[0] and apart[1] is tables[2]
    merged, ids = small_site.bank_sites(tables, names, 1, merge_others=True)
    assert ids == ["others"]
    np.testing.assert_array_equal(merged[0], np.vstack([tables[0], tables[2]]))
