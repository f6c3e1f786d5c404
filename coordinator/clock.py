"""The coordinator's clock: the one place its waiting reads or spends time.

The federation waits for SuperNodes to connect and for replies up to each stage's timeout.
It takes a :class:`Clock` so that tests can pass a fake one whose ``sleep`` only advances its
own time: a silent site is then excluded after its full timeout without any real waiting.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    """What the coordinator needs of a clock."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences are meaningful)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic` and :func:`time.sleep`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
