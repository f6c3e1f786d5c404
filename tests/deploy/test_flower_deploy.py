"""Integration: a real Flower deployment on localhost — one SuperLink with TLS and node
authentication, three SuperNodes (Cleveland, Hungarian, Switzerland heart data) — started,
run and stopped through ``fediim local-deploy``; then outputs, ledgers, the signed bank and
the absence of any leftover process are checked.

Switzerland never measured cholesterol (every ``chol`` is 0, i.e. missing): it has no
complete record to release, yet takes part and gets every ``chol`` imputed from the other
hospitals' cells.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fediim.cli import main
from fediim.deploy.supervisor import stray_processes
from fediim.federated.bank import ModelBank
from fediim.io.table import read_csv
from fediim.privacy import PrivacyLedger, epsilon_to_rho
from fediim.protocol.signing import load_public_key, read_signature_file, verify_bank
from tests.paths import DATASETS, missing, require_file

HEART = DATASETS / "heart"
SITES = ("cleveland", "hungarian", "switzerland")
DROP = {"ca", "thal", "slope"}
BOUNDS = {
    "age": (0, 120), "sex": (0, 1), "cp": (1, 4), "trestbps": (0, 300), "chol": (0, 800),
    "fbs": (0, 1), "restecg": (0, 2), "thalach": (0, 250), "exang": (0, 1),
    "oldpeak": (-10, 10), "num": (0, 4),
}
BIN = Path(sys.executable).parent



@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    for s in SITES:
        require_file(HEART / f"{s}.csv")
    if not (BIN / "flower-superlink").exists() and not shutil.which("flower-superlink"):
        missing("flower-superlink is not installed")


def _prepare(tmp_path: Path) -> tuple[list[Path], Path]:
    data = []
    for name in SITES:
        with open(HEART / f"{name}.csv", newline="", encoding="utf-8") as fh:
            header, *rows = list(csv.reader(fh))
        keep = [i for i, h in enumerate(header) if h not in DROP]
        chol = header.index("chol")
        path = tmp_path / "data" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow([header[i] for i in keep])
            for r in rows:
                if r[chol].strip() in ("0", "0.0"):
                    r[chol] = ""  # chol = 0 means not measured
                w.writerow([r[i] for i in keep])
        data.append(path)
    schema = tmp_path / "schema.toml"
    lines = ['missing = ["", "?"]']
    for col, (lo, hi) in BOUNDS.items():
        lines += ["", f'[columns."{col}"]', f"bounds = [{lo}, {hi}]"]
    schema.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data, schema


def test_local_deploy_over_heart_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, schema = _prepare(tmp_path)
    out = tmp_path / "fed"
    args = ["local-deploy", "--schema", str(schema), "--out", str(out), "--epsilon", "2",
            "--min-sites", "2", "--timeout", "170"]
    for d in data:
        args += ["--data", str(d)]
    code = main(args)
    err = capsys.readouterr().err
    deploy = json.loads((out / "logs" / "deploy.json").read_text())

    # every process is gone, and so is the temporary FLWR_HOME (also checked on failure)
    assert stray_processes(deploy["marker"]) == []
    assert not Path(deploy["flwr_home"]).exists()
    assert code == 0, err
    assert deploy["status"] == "finished:completed"

    view = json.loads((out / "coordinator" / "federation.json").read_text())
    assert view["status"] == "completed"
    rho_budget = epsilon_to_rho(2.0, 1e-6)

    swiss = view["sites"]["switzerland"]
    assert swiss["active"] and swiss["stages"]["impute"]["code"] == "ok", swiss
    got = read_csv(out / "switzerland" / "imputed.csv")
    chol = got.columns.index("chol")
    assert not np.isnan(got.values[:, chol]).any()  # the column it never measured

    bank_bytes = (out / "coordinator" / "bank.npz").read_bytes()
    sig = read_signature_file(out / "coordinator" / "bank.sig.json")
    verify_bank(load_public_key(out / "coordinator" / "coordinator.pub"), sig["signature"],
                bank_bytes, sig["schema_hash"], deploy["run_id"])
    assert sorted(ModelBank.from_bytes(bank_bytes).site.tolist()) != []
    assert set(view["bank"]["sites"]) >= {"cleveland", "hungarian"}

    for name, src_path in zip(SITES, data, strict=True):
        site = out / name
        entry = view["sites"][name]
        assert entry["active"] and entry["stages"]["impute"]["code"] == "ok", entry
        src = read_csv(src_path, allow_empty_columns=True)
        got = read_csv(site / "imputed.csv")
        assert got.columns == src.columns and got.n_rows == src.n_rows
        obs = ~np.isnan(src.values)
        np.testing.assert_array_equal(got.values[obs], src.values[obs])
        assert not np.isnan(got.values).any()
        n_missing = int((~obs).sum())
        assert entry["stages"]["impute"] == {"code": "ok", "reason": ""}  # a status only
        assert len((site / "audit.jsonl").read_text().splitlines()) == n_missing
        for j, col in enumerate(got.columns):
            lo, hi = BOUNDS[col]
            assert lo <= got.values[:, j].min() and got.values[:, j].max() <= hi
        ledger = PrivacyLedger.open(site / "ledger.json", rho_budget, name)
        assert 0 < ledger.spent_rho <= rho_budget * (1 + 1e-9)
        assert all(e.noise_source == "gaussian-opendp-exact" for e in ledger.entries)
        assert entry["ledger"]["rho_spent"] == pytest.approx(ledger.spent_rho)
        assert (site / "bank.npz").read_bytes() == bank_bytes
    # Hungarian has real gaps (chol, fbs, ...), imputed with help from Cleveland's cells
    audit = (out / "hungarian" / "audit.jsonl").read_text().splitlines()
    assert len(audit) > 20


def test_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    """Node authentication: a SuperNode whose key was never registered cannot join (one
    SuperLink and a refused SuperNode: ~8 s, so it runs in ``make test``)."""
    import subprocess

    from fediim.deploy.layout import prepare_federation
    from fediim.deploy.supervisor import LocalDeployment, free_ports
    from fediim.protocol.tls import write_node_auth_keypair

    data, schema = _prepare(tmp_path)
    layout = prepare_federation(data[:1], schema, tmp_path / "fed")
    dep = LocalDeployment(layout)
    try:
        dep.start()
        write_node_auth_keypair(dep.home / "rogue.key", dep.home / "rogue.pub")
        rogue = dep.start_process("supernode-rogue", [
            dep.executable("flower-supernode"), "--superlink", f"127.0.0.1:{dep.port}",
            "--port", str(free_ports(1)[0]), "--root-certificates", str(dep.ca_cert),
            "--auth-supernode-private-key", str(dep.home / "rogue.key"), "--max-retries", "1",
        ], {**dep.env, "FLWR_HOME": str(dep.home / "rogue")})
        try:
            code = rogue.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        log = dep.processes.log_path("supernode-rogue").read_text()
        assert code not in (None, 0), log
        assert "Failed to activate SuperNode" in log
    finally:
        dep.stop()
    assert stray_processes(dep.marker) == []
