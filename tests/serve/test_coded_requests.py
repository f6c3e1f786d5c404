"""A coded site's service reads a JSON request's coded cells as declared levels, as it
reads a CSV body's, and answers with levels (and their probabilities), never codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fediim.deploy.layout import FederationLayout
from fediim.serve.app import create_app
from fediim.serve.auth import load_token
from fediim.serve.service import ServiceState
from fediim.serve.site import Site
from tests.apps.test_flower_coded import coded_run  # noqa: F401 - the coded federation
from tests.serve.conftest import TOKEN, serving_toml

CSV_BODY = "age,sex,cp,pressure,grade\n50,male,4,,mid\n61,,,140,\n"
JSON_ROWS = [{"age": 50, "sex": "male", "cp": 4, "pressure": None, "grade": "mid"},
             {"age": 61, "sex": None, "cp": None, "pressure": 140, "grade": None}]


@pytest.fixture
def coded_client(coded_run: FederationLayout, tmp_path: Path  # noqa: F811
                 ) -> Iterator[TestClient]:
    site = Site.open(serving_toml(sorted(coded_run.sites, key=lambda s: s.site_id)[0].config,
                                  tmp_path))
    client = TestClient(create_app(ServiceState(site, rng=np.random.default_rng(0)),
                                   load_token(site.config.serve)))
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    with client:
        yield client


def test_json_and_csv_rows_of_a_coded_site_are_read_and_answered_as_levels(
        coded_client: TestClient) -> None:
    by_json = coded_client.post("/v1/impute", json={"rows": JSON_ROWS})
    by_csv = coded_client.post("/v1/impute", content=CSV_BODY,
                               headers={"content-type": "text/csv"})
    assert by_json.status_code == by_csv.status_code == 200, by_json.text
    assert by_json.json()["rows"] == by_csv.json()["rows"]
    first, second = by_json.json()["rows"]
    assert first["values"]["sex"] == "male" and first["values"]["cp"] == 4.0
    assert first["values"]["grade"] == "mid"
    assert second["values"]["sex"] in ("female", "male")
    assert second["values"]["cp"] in (1.0, 2.0, 3.0, 4.0)
    assert second["values"]["grade"] in ("low", "mid", "high")
    for name in ("sex", "cp"):
        cell = second["imputed"][name]
        assert cell["value"] == second["values"][name]
        assert 0 < cell["probability"] <= 1
        assert cell["uncertainty"] == pytest.approx(1 - cell["probability"])
    assert "probability" not in first["imputed"]["pressure"]


@pytest.mark.parametrize("cell", [5, "5", "unknown", True, 2.5])
def test_a_json_cell_that_is_no_declared_level_is_refused(coded_client: TestClient,
                                                         cell: object) -> None:
    """cp declares the levels 1-4: a 5 (a code's range, not a level) is refused, naming the
    row, the column and the levels (not the value)."""
    rows = [dict(JSON_ROWS[0]), {**JSON_ROWS[1], "cp": cell}]
    response = coded_client.post("/v1/impute", json={"rows": rows})
    assert response.status_code == 422
    body = response.json()
    assert body["row"] == 2 and body["column"] == "cp"
    assert "declared levels [1, 2, 3, 4]" in body["error"]


def test_draws_of_a_coded_cell_are_declared_levels(coded_client: TestClient) -> None:
    response = coded_client.post("/v1/impute?draws=2", json={"rows": JSON_ROWS})
    assert response.status_code == 200, response.text
    imputed = response.json()["rows"][1]["imputed"]
    assert set(imputed["sex"]["draws"]) <= {"female", "male"}
    assert set(imputed["cp"]["draws"]) <= {1.0, 2.0, 3.0, 4.0}
    assert set(imputed["grade"]["draws"]) <= {"low", "mid", "high"}
    assert len(imputed["cp"]["draws"]) == 2
