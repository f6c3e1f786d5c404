"""``python -m fediim.deploy.supernode``: Flower's ``flower-supernode`` with short idle polls.

Flower's SuperNode (flwr 1.41.0 and 1.42.0, ``flwr/supernode/start_client_internal.py``)
sleeps a hard-coded 3 s after every pull from the SuperLink that brings no message, and
polls for its ClientApp's reply every 0.5 s; no flag or variable changes either. A fediim
run is a chain of rounds of one message per node, so every round waits for the slowest
node's idle sleep (about 2.4 s on average with 4 nodes) before a node even sees its
message. ``fediim local-deploy`` starts its SuperNodes through this module, which
shortens those two sleeps (:data:`IDLE_PULL_SECONDS`, :data:`REPLY_POLL_SECONDS`) and then
runs Flower's own command line with the same arguments: the same TLS, node
authentication, messages and processes; the SuperNode only asks the SuperLink more often.

The shortening is applied only when that module's source is byte for byte one this
project has read (:data:`KNOWN_SOURCES`); on any other Flower release it is skipped with
a warning and the SuperNode runs as Flower ships it.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["IDLE_PULL_SECONDS", "KNOWN_SOURCES", "REPLY_POLL_SECONDS", "ShortPollClock",
           "main", "shorten_polls", "source_digest"]

log = logging.getLogger("fediim.deploy")

#: Seconds between a SuperNode's pulls while no message is waiting (Flower: 3 s).
IDLE_PULL_SECONDS = 0.5
#: Seconds between a SuperNode's looks for its ClientApp's reply (Flower: 0.5 s).
REPLY_POLL_SECONDS = 0.1
#: SHA-256 of ``flwr/supernode/start_client_internal.py`` in the Flower releases whose
#: loop was read for this: 1.41.0 and 1.42.0 ship the same file.
KNOWN_SOURCES = frozenset({
    "d6342f743fdf768f63305b88414ae2654e9a21bda153739da19c608e8d375067",
})
#: Flower's hard-coded sleeps in that module, and what they become.
_SHORTER = {3: IDLE_PULL_SECONDS, 0.5: REPLY_POLL_SECONDS}


class ShortPollClock:
    """The ``time`` module as Flower's SuperNode loop sees it: its two poll sleeps
    shortened (:data:`_SHORTER`), every other sleep and attribute ``time``'s own."""

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or the shorter interval that replaces a poll sleep."""
        time.sleep(_SHORTER.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def source_digest(module: ModuleType) -> str:
    """SHA-256 of ``module``'s source file."""
    path = inspect.getsourcefile(module)
    if path is None:
        raise OSError(f"{module.__name__} has no source file")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shorten_polls(module: ModuleType | None = None) -> bool:
    """Shorten the poll sleeps of Flower's SuperNode loop (``module``: default
    ``flwr.supernode.start_client_internal``) if its source is a known one; whether done."""
    if module is None:
        from flwr.supernode import start_client_internal as module
    if isinstance(getattr(module, "time", None), ShortPollClock):
        return True
    try:
        digest = source_digest(module)
    except OSError as exc:
        digest = f"unreadable ({exc})"
    if digest not in KNOWN_SOURCES or not isinstance(getattr(module, "time", None),
                                                     ModuleType):
        log.warning("fediim: not shortening the SuperNode's polls: %s is not a Flower "
                    "release read for it (source sha256 %s); it polls as Flower ships it",
                    module.__name__, digest)
        return False
    module.time = ShortPollClock()  # type: ignore[attr-defined]
    return True


def main() -> None:
    """``flower-supernode`` with the arguments given, after :func:`shorten_polls`."""
    if shorten_polls():
        print(f"fediim: the SuperNode polls every {IDLE_PULL_SECONDS:g} s when idle, every "
              f"{REPLY_POLL_SECONDS:g} s for a reply", file=sys.stderr, flush=True)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
