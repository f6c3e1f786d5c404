"""Atomic file writes: a file is either fully written or left untouched.

Every artefact fediim persists (imputed tables, privacy ledgers, model banks) goes through
here, so a crash or an error midway never leaves a half-written file behind (DESIGN §3).
The data goes to a temporary file in the target's directory, is flushed and fsynced, then
``os.replace``-d onto the target (atomic on POSIX and Windows); the directory is fsynced
where the platform allows so the rename itself survives a power loss.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_secret", "atomic_write_text"]

_WRITE_MODES = {"w", "wt", "wb"}


def _umask() -> int:
    """Current process umask (read without changing it where possible)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # fallback: not thread-safe, but only briefly changed
    os.umask(old)
    return old


def _target_mode(path: Path) -> int:
    """Permissions the written file should get: the old file's, else what open() would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _fsync_dir(directory: Path) -> None:
    """Persist a rename by fsyncing its directory (a no-op where unsupported, e.g. Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "w",
    newline: str | None = None,
    encoding: str | None = "utf-8",
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it is replaced atomically when the block exits.

    ``mode`` is ``"w"``/``"wt"`` (text, ``encoding``/``newline`` as in :func:`open`) or
    ``"wb"``. Parent directories are created. If the block raises, the temporary file is
    removed and the target keeps its previous content (or stays absent).
    """
    if mode not in _WRITE_MODES:
        raise ValueError(
            f"atomic_open: mode {mode!r} not supported; expected one of 'w', 'wt', 'wb'"
        )
    target = Path(path)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    perms = _target_mode(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    tmp = Path(tmp_name)
    try:
        if "b" in mode:
            fh: IO[Any] = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, perms)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` readable by its owner only (0600).

    For private keys. The file is created 0600 first (and an existing one set to 0600),
    because :func:`atomic_open` keeps the mode the target already has.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch(mode=0o600, exist_ok=True)
    os.chmod(p, 0o600)
    atomic_write_bytes(p, data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text``, written exactly (no newline translation)."""
    with atomic_open(path, "w", newline="", encoding=encoding) as fh:
        fh.write(text)
