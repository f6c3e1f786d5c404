"""In-process app tests: sites wait for their reply-time quantum on a fake clock."""

from __future__ import annotations

import pytest

import site_client.site as site_module
from tests.fake_clock import FakeClock


@pytest.fixture(autouse=True)
def fake_reply_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The sites' reply clock: quantised replies cost no real time in these tests."""
    clock = FakeClock()
    monkeypatch.setattr(site_module, "REPLY_CLOCK", clock)
    return clock
