"""Atomic writes: complete file or untouched target, never a half-written one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fediim.io import atomic
from fediim.io.atomic import (
    atomic_open,
    atomic_outputs,
    atomic_write_bytes,
    atomic_write_secret,
    atomic_write_text,
)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_bytes_and_text(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01binary")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01binary"
    atomic_write_text(tmp_path / "t.txt", "héllo\r\nworld\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\r\nworld\n".encode()  # exact text
    assert _leftovers(tmp_path) == []


def test_creates_parent_dirs_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert _leftovers(target.parent) == []


def test_atomic_open_text_and_binary(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "x.txt") as fh:
        fh.write("a\n")
        fh.write("b\n")
    assert (tmp_path / "x.txt").read_text() == "a\nb\n"
    with atomic_open(tmp_path / "x.bin", "wb") as fh:
        fh.write(b"\xff")
    assert (tmp_path / "x.bin").read_bytes() == b"\xff"


def test_exception_midway_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    target.write_text("old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target) as fh:
            fh.write("new partial content")
            fh.flush()
            raise RuntimeError("boom")
    assert target.read_text() == "old content"
    assert _leftovers(tmp_path) == []


def test_exception_midway_no_target_created(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as fh:
            fh.write("x")
            raise KeyboardInterrupt
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_failed_replace_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_fsync_is_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    atomic_write_bytes(tmp_path / "f", b"x")
    assert len(calls) >= 1  # file (and directory, where supported)


def test_bad_mode_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode 'a' not supported"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions_preserved(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write_text(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    fresh = tmp_path / "fresh"
    atomic_write_text(fresh, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_secret_is_owner_only_even_over_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site.key"
    atomic_write_secret(path, b"secret-1")
    assert path.read_bytes() == b"secret-1"
    assert (path.stat().st_mode & 0o777) == 0o600
    path.chmod(0o644)  # an existing, world-readable file is tightened, not kept
    atomic_write_secret(path, b"secret-2")
    assert path.read_bytes() == b"secret-2"
    assert (path.stat().st_mode & 0o777) == 0o600


# -- several outputs, committed together ---------------------------------------------------


def _write_group(paths: list[Path], texts: list[str]) -> None:
    with atomic_outputs() as outputs:
        for path, text in zip(paths, texts, strict=True):
            with outputs.open(path, newline="") as fh:
                fh.write(text)


def test_output_group_commits_every_file(tmp_path: Path) -> None:
    paths = [tmp_path / "out.csv", tmp_path / "sub" / "out.flags.csv"]
    paths[0].write_text("old")
    _write_group(paths, ["a", "b"])
    assert [p.read_text() for p in paths] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "out.csv", "out.flags.csv"]


def test_output_group_with_a_directory_target_writes_nothing(tmp_path: Path) -> None:
    """Finding: with the audit path a directory, the flags file was still written."""
    out, flags, audit = tmp_path / "out.csv", tmp_path / "out.flags.csv", tmp_path / "audit"
    out.write_text("old table")
    audit.mkdir()
    with pytest.raises(IsADirectoryError):
        _write_group([out, flags, audit], ["t", "f", "a"])
    assert out.read_text() == "old table" and not flags.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit", "out.csv"]


def test_output_group_rolls_back_when_a_rename_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [tmp_path / f"f{i}.txt" for i in range(3)]
    for p in paths:
        p.write_text(f"old {p.name}")
    real_replace = os.replace
    failed: list[Path] = []

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == paths[2] and str(src).endswith(".tmp") and not failed:
            failed.append(Path(dst))
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _write_group(paths, ["new0", "new1", "new2"])
    monkeypatch.undo()
    assert [p.read_text() for p in paths] == [f"old {p.name}" for p in paths]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.txt", "f1.txt", "f2.txt"]


def test_output_group_discards_everything_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_outputs() as outputs:
        with outputs.open(tmp_path / "a.txt") as fh:
            fh.write("a")
        raise RuntimeError("imputation failed")
    assert list(tmp_path.iterdir()) == []
