"""``fediim simulate``: the same apps on Flower's Simulation Engine (needs Ray, extra ``sim``).

Skipped where Ray is not installed (the default dev install); measured here with
``pip install 'fediim[sim]'``: three sites of 300 rows in ~33 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fediim.cli import main
from fediim.deploy.supervisor import stray_processes
from fediim.io.table import read_csv
from tests.paths import require_module


def _site(path: Path, rng: np.random.Generator) -> np.ndarray:
    n = 300
    a = rng.uniform(0, 10, n)
    x = np.column_stack([a, 2 * a + rng.normal(0, 1, n), a**1.5 + rng.normal(0, 1, n)])
    x[rng.choice(n, 15, replace=False), rng.integers(0, 3, 15)] = np.nan
    lines = ["x,y,z"] + [",".join("" if np.isnan(v) else f"{v:.4f}" for v in r) for r in x]
    path.write_text("\n".join(lines) + "\n")
    return x


def test_simulate_runs_the_federation(tmp_path: Path) -> None:
    require_module("ray", extra="sim")
    rng = np.random.default_rng(0)
    data = {s: _site(tmp_path / f"site_{s}.csv", rng) for s in "abc"}
    schema = tmp_path / "schema.toml"
    schema.write_text('[columns."x"]\nbounds = [0, 10]\n[columns."y"]\nbounds = [-10, 30]\n'
                      '[columns."z"]\nbounds = [-10, 40]\n')
    out = tmp_path / "out"
    args = ["simulate", "--schema", str(schema), "--out", str(out), "--epsilon", "2"]
    for s in "abc":
        args += ["--data", str(tmp_path / f"site_{s}.csv")]
    code = main(args)
    deploy = json.loads((out / "logs" / "deploy.json").read_text())
    assert stray_processes(deploy["marker"]) == []
    assert not Path(deploy["flwr_home"]).exists()
    assert code == 0
    for s in data:
        x = read_csv(tmp_path / f"site_{s}.csv").values
        imputed = read_csv(out / f"site_{s}" / "imputed.csv").values
        observed = ~np.isnan(x)
        np.testing.assert_array_equal(imputed[observed], x[observed])
        assert not np.isnan(imputed).any()
        assert (out / f"site_{s}" / "ledger.json").is_file()
