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

__all__ = ["PUBLIC_MODE", "SECRET_MODE", "OutputGroup", "atomic_open", "atomic_outputs",
           "atomic_write_bytes", "atomic_write_public", "atomic_write_secret",
           "atomic_write_text"]

_WRITE_MODES = {"w", "wt", "wb"}
#: Permissions of a file anyone may read (public keys, certificates), whatever the umask.
PUBLIC_MODE = 0o644
#: Permissions of a file only its owner may read (private keys).
SECRET_MODE = 0o600


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
    permissions: int | None = None,
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it is replaced atomically when the block exits.

    ``mode`` is ``"w"``/``"wt"`` (text, ``encoding``/``newline`` as in :func:`open`) or
    ``"wb"``. Parent directories are created. If the block raises, the temporary file is
    removed and the target keeps its previous content (or stays absent). ``permissions``:
    the file's mode bits (default: the old file's, else what the umask gives).
    """
    with atomic_outputs() as group, group.open(path, mode, newline, encoding,
                                               permissions) as fh:
        yield fh


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes,
                       permissions: int | None = None) -> None:
    """Atomically replace ``path`` with ``data`` (``permissions`` as in :func:`atomic_open`)."""
    with atomic_open(path, "wb", permissions=permissions) as fh:
        fh.write(data)


def atomic_write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` readable by its owner only (0600).

    For private keys: the staged file is 0600 from its creation on, so the key is never
    readable by others, not even for a moment.
    """
    atomic_write_bytes(path, data, permissions=SECRET_MODE)


def atomic_write_public(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` readable by all, writable by its owner
    only (0644), whatever the umask: for public keys and certificates, which others must
    read but nobody else may replace."""
    atomic_write_bytes(path, data, permissions=PUBLIC_MODE)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text``, written exactly (no newline translation)."""
    with atomic_open(path, "w", newline="", encoding=encoding) as fh:
        fh.write(text)


class OutputGroup:
    """Files staged together and committed together: all of them are written, or none.

    :meth:`open` stages one file (a temporary file beside its target, fsynced when its
    block exits). :meth:`commit` first checks every target (its directory exists, it is
    not a directory), then moves any existing targets aside, renames every staged file
    into place and only then drops the old versions; if a rename fails, the targets
    already replaced get their old content back. Only a crash in the middle of the
    renames can leave a mix, and the old versions are then still on disk beside their
    targets (``.NAME.*.old``).
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}

    @contextmanager
    def open(self, path: str | os.PathLike[str], mode: str = "w",
             newline: str | None = None, encoding: str | None = "utf-8",
             permissions: int | None = None) -> Iterator[IO[Any]]:
        """Stage ``path``: write it in the block; nothing is visible until :meth:`commit`.

        ``permissions``: the file's mode bits; by default the old file's, else what
        :func:`open` would give under the current umask.
        """
        if mode not in _WRITE_MODES:
            raise ValueError(f"OutputGroup.open: mode {mode!r} not supported; expected one "
                             "of 'w', 'wt', 'wb'")
        target = Path(path)
        if target in self._staged:
            raise ValueError(f"{target} is staged twice")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                        dir=target.parent)
        self._staged[target] = Path(tmp_name)
        with os.fdopen(fd, "wb") if "b" in mode else os.fdopen(
                fd, "w", encoding=encoding, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, _target_mode(target) if permissions is None else permissions)

    def commit(self) -> None:
        """Put every staged file in place, or none of them (see the class docstring)."""
        try:
            for target in self._staged:
                if target.is_dir():
                    raise IsADirectoryError(f"{target} is a directory; expected a file path")
            self._place_all()
        finally:
            self.discard()

    def _place_all(self) -> None:
        moved_aside: dict[Path, Path] = {}
        placed: list[Path] = []
        single = len(self._staged) == 1  # one file: os.replace alone is atomic
        try:
            for target, tmp in self._staged.items():
                if target.exists() and not single:
                    moved_aside[target] = _move_aside(target)
                os.replace(tmp, target)
                placed.append(target)
        except BaseException:
            _roll_back(placed, moved_aside)
            raise
        for old in moved_aside.values():
            old.unlink(missing_ok=True)
        for directory in {t.parent for t in placed}:
            _fsync_dir(directory)

    def discard(self) -> None:
        """Remove every staged file that was not committed."""
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()


def _move_aside(target: Path) -> Path:
    """Rename ``target`` to a fresh ``.NAME.*.old`` beside it; return that path."""
    fd, old_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".old",
                                    dir=target.parent)
    os.close(fd)
    os.replace(target, old_name)
    return Path(old_name)


def _roll_back(placed: list[Path], moved_aside: dict[Path, Path]) -> None:
    """Undo a partial commit: new files out, old files back."""
    for target in placed:
        target.unlink(missing_ok=True)
    for target, old in moved_aside.items():
        os.replace(old, target)


@contextmanager
def atomic_outputs() -> Iterator[OutputGroup]:
    """An :class:`OutputGroup` committed when the block exits normally, discarded if it raises.

    Example::

        with atomic_outputs() as outputs:
            with outputs.open("out.csv", newline="") as fh:
                fh.write(table)
            with outputs.open("out.audit.jsonl") as fh:
                fh.write(audit)
        # both files are in place here, or neither is (and the old ones are untouched)
    """
    group = OutputGroup()
    try:
        yield group
    except BaseException:
        group.discard()
        raise
    group.commit()
