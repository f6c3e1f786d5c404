"""``POST /v1/impute?draws=M``: besides the single imputation, every imputed cell carries
its M draws from the bank (as ``fediim impute --site-config --multiple M`` draws them),
each inside the column's bounds; a bad M is refused before the body is read."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fediim.serve.app import MAX_DRAWS
from fediim.serve.service import ServiceState
from tests.serve.conftest import json_rows, new_rows

Service = tuple[ServiceState, TestClient]


def test_each_imputed_cell_carries_its_draws(service: Service) -> None:
    state, client = service
    x = new_rows(70, 30)
    response = client.post("/v1/impute?draws=3", json=json_rows(x))
    assert response.status_code == 200, response.text
    bounds, columns = state.site.schema.bounds_array(), state.site.columns
    spread = []
    for i, row in enumerate(response.json()["rows"]):
        assert set(row["imputed"]) == {columns[c] for c in np.flatnonzero(np.isnan(x[i]))}
        for name, cell in row["imputed"].items():
            c = columns.index(name)
            assert len(cell["draws"]) == 3
            assert all(bounds[c, 0] <= v <= bounds[c, 1] for v in cell["draws"])
            spread.append(np.ptp(cell["draws"]))
    assert len(spread) > 5 and np.mean(np.array(spread) > 0) > 0.8  # draws differ
    assert state.totals()["cells_imputed"] == len(spread)  # counted once, not per draw


def test_without_draws_a_cell_has_none(service: Service) -> None:
    _, client = service
    body = client.post("/v1/impute", json=json_rows(new_rows(71, 10))).json()
    assert all("draws" not in cell for row in body["rows"] for cell in row["imputed"].values())


@pytest.mark.parametrize("draws", ["1", str(MAX_DRAWS + 1), "x", "-2", ""])
def test_a_bad_number_of_draws_is_refused(service: Service, draws: str) -> None:
    state, client = service
    response = client.post(f"/v1/impute?draws={draws}", json=json_rows(new_rows(72, 5)))
    assert response.status_code == 422 and "draws" in response.json()["error"]
    assert state.totals()["refused"] == 1
