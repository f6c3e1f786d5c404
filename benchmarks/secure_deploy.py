"""Secure aggregation in a real TLS ``local-deploy``: wall time against per-site release,
and a SuperNode killed after key sharing.

Data: the first 4,000 rows of ``ccpp.csv`` (UCI Combined Cycle Power Plant, 5 columns) in
a seeded shuffle, 5 % of rows missing one value (the paper protocol's mask), split into 4
sites x 1,000 rows; the schema's bounds are each column's range widened by 10 %. Three
runs, one after the other, each a fresh ``local-deploy`` (SuperLink with TLS and node
authentication, 4 SuperNodes) at ε = 1:

1. ``per-site``: handshake, release, impute;
2. ``secure``: handshake (with the keys), share keys (with the first sum's masked
   inputs), three sums (masked input + unmask each; the first one's inputs came with the
   keys), impute;
3. ``secure`` with one SuperNode SIGKILLed as soon as ``federation.json`` records the
   share-keys round (the run must complete with the other three; it waits the short
   ``release-timeout`` of this run for the silent site once).

Every run starts its SuperNodes as ``local-deploy`` does, with shorter Flower polls
(:mod:`fediim.deploy.supernode`); ``--flower-polls`` adds runs 1 and 2 with Flower's own
polls, each right after its short-poll twin (the same load, as far as a shared machine
allows). Wall time is ``deploy.json``'s ``phase_seconds.run`` (submission to finished run)
and ``seconds`` (everything, start and stop included); each round's time is the
coordinator's "N repl(ies) in X s" in the run log. Usage::

    python benchmarks/secure_deploy.py --out benchmarks/results/secure_deploy.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fediim.deploy.local import local_deploy
from fediim.deploy.supervisor import kill_supernode
from fediim.errors import RunNotCompleted
from fediim.io.json_results import write_results
from fediim.io.schema import TableSchema
from fediim.io.table import read_csv, write_csv

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
N_SITES, ROWS_PER_SITE = 4, 1000
#: Seconds the coordinator waits for the killed site's silent round.
KILL_RELEASE_TIMEOUT = 60.0


def prepare_sites(directory: Path, ccpp: Path = DATASETS / "ccpp.csv",
                  seed: int = 0) -> tuple[list[Path], Path]:
    """Write the 4 site tables and the schema under ``directory``; (data files, schema)."""
    table = read_csv(ccpp)
    rng = np.random.default_rng(seed)
    values = table.values[rng.permutation(len(table.values))[:N_SITES * ROWS_PER_SITE]]
    lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    pad = 0.1 * (hi - lo)
    rows = rng.random(len(values)) < 0.05
    values[rows, rng.integers(0, values.shape[1], len(values))[rows]] = np.nan
    directory.mkdir(parents=True, exist_ok=True)
    schema = TableSchema.model_validate({"columns": [
        {"name": c, "bounds": [float(a - p), float(b + p)]}
        for c, a, b, p in zip(table.columns, lo, hi, pad, strict=True)]})
    schema_path = directory / "schema.toml"
    schema_path.write_text(schema.to_toml(), encoding="utf-8")
    files = []
    for site in range(N_SITES):
        path = directory / f"site{chr(ord('a') + site)}.csv"
        write_csv(path, values[site * ROWS_PER_SITE:(site + 1) * ROWS_PER_SITE],
                  table.columns, float_format=None)
        files.append(path)
    return files, schema_path


class KillAfterKeySharing(threading.Thread):
    """Kills ``site``'s SuperNode as soon as ``federation.json`` under ``out`` records the
    share-keys round (an event of the run, not a sleep that races it)."""

    def __init__(self, out: Path, site: str) -> None:
        super().__init__(daemon=True)
        self.view, self.config = out / "coordinator" / "federation.json", out / site / "site.toml"
        self.done = threading.Event()
        self.pids: list[int] = []
        self.killed_at: float | None = None

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                secure = json.loads(self.view.read_text()).get("secure") or {}
            except (OSError, ValueError):
                continue
            if any(r["round"] == "share_keys" for r in secure.get("rounds", [])):
                self.killed_at = time.time()
                self.pids = kill_supernode(self.config)
                return


def deploy(data: list[Path], schema: Path, out: Path, aggregation: str,
           kill: str | None = None, short_polls: bool = True,
           **run_config: Any) -> dict[str, Any]:
    """One ``local-deploy`` run (``short_polls``: see :func:`local_deploy`); its timings,
    status and the secure rounds' record."""
    killer = KillAfterKeySharing(out, kill) if kill else None
    load_before = os.getloadavg()[0]
    if killer:
        killer.start()
    try:
        view = local_deploy(data, schema, out, epsilon=1.0, min_sites=2,
                            run_config={"aggregation": aggregation, **run_config},
                            timeout=600, short_polls=short_polls)
    except RunNotCompleted as exc:
        view = exc.federation
    finally:
        if killer:
            killer.done.set()
            killer.join(timeout=5)
    record = view.get("deploy", {})
    return {"aggregation": aggregation, "short_polls": short_polls, "status": view.get("status"),
            "error": view.get("error"), "run_seconds": record.get("phase_seconds", {}).get("run"),
            "total_seconds": record.get("seconds"), "phase_seconds": record.get("phase_seconds"),
            "round_seconds": round_seconds(out / "logs" / "run.log"),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "killed": kill, "killed_pids": killer.pids if killer else [],
            "marker": record.get("marker"),
            "dropped": record.get("dropped"),
            "secure": view.get("secure"), "bank_cells": (view.get("bank") or {}).get("n_cells"),
            "imputed": sorted(s for s, v in (view.get("sites") or {}).items()
                              if v.get("stages", {}).get("impute", {}).get("code") == "ok")}


def round_seconds(run_log: Path) -> dict[str, float]:
    """Each round's time as the coordinator logged it ("<round>: N repl(ies) in X s")."""
    try:
        text = run_log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    return {name: float(seconds) for name, seconds in
            re.findall(r"INFO.*?:\s+(\S+): \d+ repl\(ies\) in ([\d.]+) s", text)}


def run_all(directory: Path, flower_polls: bool = False) -> dict[str, Any]:
    """The runs (see module docstring); ``flower_polls`` adds runs 1 and 2 with Flower's
    own polls."""
    data, schema = prepare_sites(directory / "data")
    runs: dict[str, dict[str, Any]] = {}
    for aggregation in ("per-site", "secure"):
        key = aggregation.replace("-", "_")
        runs[key] = deploy(data, schema, directory / aggregation, aggregation)
        if flower_polls:
            runs[f"{key}_flower_polls"] = deploy(data, schema,
                                                 directory / f"{aggregation}-flower-polls",
                                                 aggregation, short_polls=False)
    runs["secure_killed"] = deploy(data, schema, directory / "secure-killed", "secure",
                                   kill="sited", **{"release-timeout": KILL_RELEASE_TIMEOUT})
    ratios = {"secure_over_per_site_run_time": round(
        runs["secure"]["run_seconds"] / runs["per_site"]["run_seconds"], 3)}
    if flower_polls:
        ratios["secure_over_per_site_run_time_flower_polls"] = round(
            runs["secure_flower_polls"]["run_seconds"]
            / runs["per_site_flower_polls"]["run_seconds"], 3)
    return {"data": f"ccpp.csv, {N_SITES} sites x {ROWS_PER_SITE} rows, seed 0, 5% rows "
                    "missing one value", "epsilon": 1.0, "runs": runs, **ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--work", type=Path, default=None,
                        help="working directory (default: a temporary one)")
    parser.add_argument("--flower-polls", action="store_true",
                        help="also run per-site and secure with Flower's own polls")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="secure-deploy-") as tmp:
        results = run_all(args.work or Path(tmp), args.flower_polls)
    text = json.dumps(results, indent=2)
    if args.out:
        write_results(args.out, results, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
