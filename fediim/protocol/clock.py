"""Clocks for the apps: the one place their waiting reads or spends time.

The coordinator waits for SuperNodes to connect and for replies up to each stage's timeout;
a site holds each reply until a whole multiple of its reply-time quantum has passed. Both
take a :class:`Clock` so that tests can pass a fake one whose ``sleep`` only advances its
own time: a silent site is then excluded after its full timeout without any real waiting.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "sleep_to_quantum"]


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


def sleep_to_quantum(clock: Clock, started: float, quantum: float) -> float:
    """Sleep until a whole multiple of ``quantum`` seconds has passed since ``started``.

    Returns the total seconds elapsed. With ``quantum <= 0`` it returns at once. Rounding
    the time a reply takes up to a multiple of the quantum hides how long the work took
    within the quantum (a site's release time grows with its number of records).
    """
    elapsed = clock.monotonic() - started
    if quantum <= 0:
        return elapsed
    target = max(1, math.ceil(elapsed / quantum)) * quantum
    clock.sleep(target - elapsed)
    return target
