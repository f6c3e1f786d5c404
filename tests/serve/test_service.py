"""``fediim serve`` over the files of a federation run: it imputes new rows as
``fediim impute --site-config`` does, spends no budget, counts its fallbacks, exports its
metrics, guards its door and its bounds, and never logs a value."""

from __future__ import annotations

import csv
import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fediim.cli import main
from fediim.errors import ExitCode
from fediim.io.table import read_csv
from fediim.protocol.site_config import load_site_config
from fediim.serve.service import ServiceState
from tests.apps.test_flower_apps import COLUMNS, RUN_ID
from tests.serve.conftest import TOKEN, json_rows, new_rows, serving_toml, write_rows

Service = tuple[ServiceState, TestClient]


def _today() -> np.ndarray:
    """New rows: some incomplete, two complete, one observing nothing (the fallback)."""
    x = new_rows(11, 40)
    x[0] = np.nan
    x[1:3] = new_rows(12, 2)
    x[1:3][np.isnan(x[1:3])] = 100.0
    return x


def _metrics(client: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return found


def _flags_fallback_rate(flags: Path) -> tuple[int, int]:
    with flags.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    methods = [row[f"{c}_method"] for row in rows for c in COLUMNS if row[f"{c}_imputed"] == "1"]
    return methods.count("fallback"), len(methods)


def test_serve_and_cli_impute_new_rows_alike_without_a_ledger_entry(
        service: Service, deployed_site: Path, tmp_path: Path) -> None:
    state, client = service
    ledger = state.site.config.ledger
    before = ledger.read_bytes()
    x = _today()
    response = client.post("/v1/impute", json=json_rows(x))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bank"]["run_id"] == RUN_ID and body["columns"] == COLUMNS
    served = np.array([[row["values"][c] for c in COLUMNS] for row in body["rows"]])
    observed = ~np.isnan(x)
    np.testing.assert_array_equal(served[observed], x[observed])
    assert not np.isnan(served).any()
    cells = [cell for row in body["rows"] for cell in row["imputed"].values()]
    assert len(cells) == int((~observed).sum())
    assert {cell["method"] for cell in cells} == {"hybrid", "fallback"}
    assert all(cell["uncertainty"] >= 0 for cell in cells)

    source = write_rows(tmp_path / "today.csv", x)
    out = tmp_path / "out.csv"
    assert main(["impute", str(source), "-o", str(out), "--site-config",
                 str(deployed_site)]) == ExitCode.OK
    np.testing.assert_allclose(read_csv(out).values, served, rtol=1e-12)
    assert ledger.read_bytes() == before  # neither spent anything nor wrote an entry

    fallback, imputed = _flags_fallback_rate(tmp_path / "out.flags.csv")
    assert fallback == 4 and body["summary"]["fallback_rate"] == fallback / imputed
    metrics = _metrics(client)
    assert metrics["fediim_fallback_ratio"][()] == pytest.approx(fallback / imputed)
    by_method = {dict(k)["method"]: v for k, v in metrics["fediim_cells_imputed_total"].items()}
    assert by_method == {"fallback": fallback, "hybrid": imputed - fallback}


def test_metrics_carry_everything_the_site_watches(service: Service) -> None:
    state, client = service
    for seed in range(20, 25):
        assert client.post("/v1/impute", json=json_rows(new_rows(seed, 30))).status_code == 200
    client.post("/v1/impute", json={"rows": [{"age": "old"}]})
    metrics = _metrics(client)
    assert metrics["fediim_requests_total"] == {(("status", "200"),): 5.0,
                                                (("status", "422"),): 1.0}
    assert metrics["fediim_rows_total"][()] == 150
    assert state.totals()["requests"] == 6 and state.totals()["refused"] == 1
    assert metrics["fediim_request_seconds_count"][()] == 6
    assert metrics["fediim_request_seconds_bucket"][(("le", "+Inf"),)] == 6
    info = dict(next(iter(metrics["fediim_bank_info"])))
    assert info["run_id"] == str(RUN_ID) and info["mode"] == "hybrid"
    assert 0 <= metrics["fediim_bank_age_seconds"][()] < 3600
    assert metrics["fediim_bank_stale"][()] == 0
    summary = state.budget().summary
    assert summary is not None and summary["epsilon_spent"] > 0
    assert metrics["fediim_budget_epsilon_spent"][()] == pytest.approx(summary["epsilon_spent"])
    assert metrics["fediim_budget_epsilon_remaining"][()] == pytest.approx(
        summary["epsilon_budget"] - summary["epsilon_spent"])
    assert metrics["fediim_budget_releases"][()] == summary["releases"] > 0
    monitored = {dict(k)["column"]: v for k, v in metrics["fediim_monitored_rmse"].items()}
    counts = {dict(k)["column"]: v for k, v in metrics["fediim_monitored_cells"].items()}
    assert set(monitored) == set(COLUMNS) and sum(counts.values()) > 50
    assert all(v > 0 for c, v in monitored.items() if counts[c] > 0)
    assert set(dict(k)["column"] for k in metrics["fediim_drift_mean_shift"]) == set(COLUMNS)
    assert metrics["fediim_drift"][()] == 0
    # every key of 4 columns was made at start-up (28), plus those of rows observing nothing
    assert metrics["fediim_plans"][()] == state.site.engine.n_plans >= 28


def test_csv_bodies_are_imputed_too(service: Service) -> None:
    _, client = service
    text = "age,bp,chol,hr\n61,,250,130\n,140,,\n"
    response = client.post("/v1/impute", content=text, headers={"Content-Type": "text/csv"})
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    assert set(rows[0]["imputed"]) == {"bp"} and set(rows[1]["imputed"]) == {"age", "chol", "hr"}


@pytest.mark.parametrize(("body", "kind", "row", "column"), [
    ({"rows": [{"age": 50}, {"age": 51, "bp": "high"}]}, "json", 2, "bp"),
    ({"rows": [{"age": 50, "weight": 80}]}, "json", 1, "weight"),
    ({"rows": [{"age": True}]}, "json", 1, "age"),
    ("age,bp,chol,hr\n50,130,240,140\n50,abc,240,140\n", "csv", 3, "bp"),
])
def test_a_bad_row_is_a_422_naming_row_and_column(
        service: Service, body: object, kind: str, row: int, column: str) -> None:
    _, client = service
    if kind == "csv":
        response = client.post("/v1/impute", content=str(body),
                               headers={"Content-Type": "text/csv"})
    else:
        response = client.post("/v1/impute", json=body)
    assert response.status_code == 422
    detail = response.json()
    assert detail["row"] == row and detail["column"] == column, detail


def test_requests_are_bounded(deployed_site: Path, tmp_path: Path) -> None:
    from fediim.serve.app import create_app
    from fediim.serve.site import Site

    config = serving_toml(deployed_site, tmp_path / "small", max_rows=5, max_body_bytes=2048)
    state = ServiceState(Site.open(config))
    client = TestClient(create_app(state, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    assert client.post("/v1/impute", json=json_rows(new_rows(30, 5))).status_code == 200
    many = client.post("/v1/impute", json=json_rows(new_rows(30, 6)))
    assert many.status_code == 413 and "max_rows" in many.json()["error"]
    big = client.post("/v1/impute", content=b"{" + b" " * 4096 + b"}",
                      headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]
    assert client.post("/v1/impute", content="x",
                       headers={"Content-Type": "text/plain"}).status_code == 415
    for not_json in ("{", '{"rows": [{"age": NaN}]}', '{"rows": [{"age": Infinity}]}'):
        assert client.post("/v1/impute", content=not_json, headers={
            "Content-Type": "application/json"}).status_code == 422


def test_every_endpoint_but_healthz_needs_the_token(service: Service) -> None:
    _, client = service
    anonymous = TestClient(client.app)
    wrong = TestClient(client.app, headers={"Authorization": "Bearer not-the-token-at-all"})
    for c in (anonymous, wrong):
        assert c.post("/v1/impute", json=json_rows(new_rows(31, 1))).status_code == 401
        assert c.get("/metrics").status_code == 401
        page = c.get("/")
        assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
    assert anonymous.get("/healthz").json()["status"] == "ok"
    assert anonymous.get("/", auth=("staff", TOKEN)).status_code == 200
    # Basic is for the status page only
    assert anonymous.get("/metrics", auth=("staff", TOKEN)).status_code == 401


def test_a_bank_that_grows_stale_stops_the_service(service: Service) -> None:
    state, client = service
    start = state.clock()
    state.clock = lambda: start + timedelta(days=state.site.config.max_bank_age_days + 1)
    assert client.get("/healthz").status_code == 503
    response = client.post("/v1/impute", json=json_rows(new_rows(32, 2)))
    assert response.status_code == 503 and "stale" in response.json()["error"]
    assert _metrics(client)["fediim_bank_stale"][()] == 1


def _logged_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(record.getMessage() for record in records)


def test_no_input_row_and_no_imputed_value_reaches_a_log(
        service: Service, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    state, client = service
    monkeypatch.setattr("fediim.serve.service.DRIFT_CHECK_SECONDS", 0.0)  # after each request
    x = new_rows(33, 25) + 0.123456789  # distinctive digits
    x[0] = np.nan
    caplog.set_level(logging.DEBUG)
    response = client.post("/v1/impute", json=json_rows(x))
    bad = client.post("/v1/impute", json={"rows": [{"age": 71.987654321, "bp": "987.654"}]})
    shifted = new_rows(34, 60, shift=(40.0, 0.0, 0.0, 0.0))  # drift is logged, as aggregates
    client.post("/v1/impute", json=json_rows(shifted))
    assert response.status_code == 200 and bad.status_code == 422
    assert any("refused" in r.getMessage() for r in caplog.records)
    assert any("drift in column age" in r.getMessage() for r in caplog.records)
    logged = _logged_text(caplog.records)
    values = [v for v in x[~np.isnan(x)]] + [71.987654321, 987.654]
    values += [cell["value"] for row in response.json()["rows"]
               for cell in row["imputed"].values()]
    for value in values:
        for text in (repr(float(value)), f"{value:.6g}", f"{value:.4f}", f"{value:.2f}"):
            assert text not in logged, text


def _spoil_bank(config: Path) -> None:
    bank = load_site_config(config).bank_path
    data = bytearray(bank.read_bytes())
    data[len(data) // 2] ^= 0x01
    bank.write_bytes(bytes(data))


def _drop_signature(config: Path) -> None:
    load_site_config(config).bank_signature_path.unlink()


@pytest.mark.parametrize(("spoil", "reason"), [(_spoil_bank, "changed after it was signed"),
                                               (_drop_signature, "signature not found")])
def test_serve_refuses_a_tampered_or_unsigned_bank(
        deployed_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        spoil: object, reason: str) -> None:
    from tests.cli.test_impute_from_bank import _site_copy

    copy, _ = _site_copy(deployed_site, tmp_path)
    spoil(copy)  # type: ignore[operator]
    assert main(["serve", "--site-config", str(copy)]) == ExitCode.USAGE
    assert reason in capsys.readouterr().err


def test_serve_refuses_a_public_address_without_a_token(
        deployed_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--site-config", str(deployed_site), "--host", "0.0.0.0"]) \
        == ExitCode.USAGE
    assert "without a token" in capsys.readouterr().err
    config = serving_toml(deployed_site, tmp_path / "loose")
    (tmp_path / "loose" / "serve.token").chmod(0o644)
    assert main(["serve", "--site-config", str(config)]) == ExitCode.USAGE
    assert "readable by others" in capsys.readouterr().err
