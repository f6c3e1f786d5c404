"""``fediim serve`` as a site runs it: a real uvicorn process on loopback over the files of
a federation run, called over HTTP, and its status page rendered in a real browser
(the OS's Chromium, driven by Playwright) with every panel filled."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.apps.test_flower_apps import COLUMNS, RUN_ID
from tests.paths import REPO, missing, require_module
from tests.serve.conftest import TOKEN, json_rows, new_rows, serving_toml

#: Chromium's names in the OS packages (Debian: chromium).
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fediim serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"fediim serve did not answer on {url} within {timeout} s")


@pytest.fixture(scope="module")
def live(deployed_site: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[str, Path]]:
    """A running ``fediim serve`` (its URL and the site TOML), stopped afterwards."""
    config = serving_toml(deployed_site, tmp_path_factory.mktemp("live"),
                          monitor_fraction=1.0, port=_free_port())
    port = int(config.read_text().split("port = ")[1].split()[0])
    log = config.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "fediim.cli", "serve",
                                    "--site-config", str(config)], cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url, config
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_live_service_imputes_over_http(live: tuple[str, Path]) -> None:
    url, config = live
    headers = {"Authorization": f"Bearer {TOKEN}"}
    x = new_rows(41, 5)
    x[0, 1] = np.nan
    response = httpx.post(f"{url}/v1/impute", json=json_rows(x), headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert "bp" in response.json()["rows"][0]["imputed"]
    assert httpx.post(f"{url}/v1/impute", json=json_rows(x), timeout=30).status_code == 401
    logged = (config.parent / "serve.log").read_text()
    assert "signature verified" in logged and "POST /v1/impute" in logged
    assert f"{x[0, 0]!r}" not in logged


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    missing("no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    raise AssertionError  # unreachable: missing() raises


def test_the_status_page_renders_every_panel_in_a_real_browser(live: tuple[str, Path]) -> None:
    executable = _browser()
    playwright = require_module("playwright.sync_api", "dev")
    url, _ = live
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for seed in range(50, 60):  # traffic, monitored cells and drift statistics to show
        assert httpx.post(f"{url}/v1/impute", json=json_rows(new_rows(seed, 20)),
                          headers=headers, timeout=30).status_code == 200
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable,
                                         args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(http_credentials={"username": "staff",
                                                            "password": TOKEN})
            page = context.new_page()
            response = page.goto(url + "/")
            assert response is not None and response.status == 200
            panels = {key: page.locator(f"section#{key}").inner_text()
                      for key in ("bank", "budget", "traffic", "quality", "drift")}
        finally:
            browser.close()
    assert str(RUN_ID) in panels["bank"] and "verified" in panels["bank"]
    assert "fresh: serving" in panels["bank"]
    assert "Epsilon spent" in panels["budget"] and "History" in panels["budget"]
    assert "unreadable" not in panels["budget"] and "release" in panels["budget"].lower()
    requests = next(line for line in panels["traffic"].splitlines() if line.startswith("Requests"))
    assert int(requests.split("\t")[1]) >= 10, panels["traffic"]
    assert "Fallback rate" in panels["traffic"] and "/s over the last minute" in panels["traffic"]
    for column in COLUMNS:
        quality_row = next(line for line in panels["quality"].splitlines()
                           if line.startswith(column))
        assert "n/a" not in quality_row, quality_row
        drift_row = next(line for line in panels["drift"].splitlines()
                         if line.startswith(column))
        assert "n/a" not in drift_row.split("\t")[1], drift_row
    assert "no drift" in panels["drift"]


def test_ci_installs_the_browser() -> None:
    """.ci/run installs Chromium when it is missing, so the browser test runs in CI."""
    script = (REPO / ".ci" / "run").read_text()
    assert "apt-get install" in script and "chromium" in script
    assert os.access(REPO / ".ci" / "run", os.X_OK)
