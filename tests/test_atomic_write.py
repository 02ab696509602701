"""atomic_write survives a power loss: file synced before the rename, folder after it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from roma_vllm.deltas import atomic_write


def _record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Spy on os.fsync and os.replace; each fsync is recorded by what the fd points at."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        kind = "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        # (kind, inode, size): the inode tells which file or folder, the size that the data was in
        events.append(("fsync", kind, st.st_ino, st.st_size))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", os.stat(src).st_ino, str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_file_is_synced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "result.json"
    data = b'{"accuracy": 0.5}\n'
    events = _record_syncs(monkeypatch)
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))

    assert target.read_bytes() == data
    file_ino = target.stat().st_ino  # the renamed temp file keeps its inode
    dir_ino = target.parent.stat().st_ino
    assert events == [
        ("fsync", "file", file_ino, len(data)),  # the whole contents, before the rename
        ("replace", file_ino, str(target)),
        ("fsync", "dir", dir_ino, target.parent.stat().st_size),  # the rename, after it
    ]


def test_folder_sync_unsupported_is_tolerated_only_for_that_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync_failing_on_dirs(code: int):
        def fsync(fd: int) -> None:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                raise OSError(code, os.strerror(code))
            real_fsync(fd)

        return fsync

    monkeypatch.setattr(os, "fsync", fsync_failing_on_dirs(errno.EINVAL))
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("a"))
    assert (tmp_path / "a.txt").read_text() == "a"

    # a real I/O error on the folder is not hidden
    monkeypatch.setattr(os, "fsync", fsync_failing_on_dirs(errno.EIO))
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("b"))


def test_a_failed_file_sync_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]  # no temp file left behind
