"""A clock for tests whose ``sleep`` only advances its own time (see fediim.protocol.clock)."""

from __future__ import annotations


class FakeClock:
    """The coordinator's clock for tests: ``sleep`` only advances this clock's time."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
