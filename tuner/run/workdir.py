"""The run directory's rules: one run at a time, and no user's work deleted unasked.

* A run holds ``RUN_DIR/run.lock`` while it uses the directory: an OS lock
  (``fcntl.flock``) on the file, which holds the holder's pid, host and start time. The
  kernel drops the lock when the process ends, however it ends, so a killed run never
  blocks the next one; a second run while the first is alive refuses with one line naming
  the holder. Under torchrun rank 0 alone takes it.
* The checkpoints of an unfinished training of the same configuration are never deleted
  silently: without ``--resume`` (continue) or ``--overwrite`` (delete them, and say so)
  the run refuses. A finished training is reused.
* Temp files of atomic writes left by a killed run (``.NAME.XXXX.tmp``) are removed when
  the next run takes the lock, and the run says so.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from roma_vllm.errors import RomaError
from tuner.train.checkpoints import (
    all_checkpoints,
    checkpoint_epoch,
    latest_checkpoint,
    legacy_checkpoints,
)

LOCK_FILENAME = "run.lock"
CHECKPOINTS_DIRNAME = "checkpoints"


class RunDirError(RomaError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class RunLock:
    """An exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILENAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirError` naming the run that holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(
                    f"--out {self.run_dir}: cannot create {self.path} ({e.strerror})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                busy = e.errno in (errno.EAGAIN, errno.EACCES)
                holder = _read_holder(fd) if busy else ""
                os.close(fd)
                if not busy:
                    raise RunDirError(
                        f"--out {self.run_dir}: cannot lock {self.path} ({e.strerror})"
                    ) from None
                raise RunDirError(
                    f"--out {self.run_dir}: in use by another roma-tune run ({holder}); wait "
                    "for it to finish or choose another --out"
                ) from None
            # A holder that released meanwhile removed the file we opened: lock the new one.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """``pid N on HOST, since TIME`` from a held lock file (its holder may still be writing)."""
    for _ in range(20):
        try:
            h = json.loads(os.pread(fd, 4096, 0).decode())
            return f"pid {h['pid']} on {h['host']}, since {h['since']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "holder unknown: the lock file names none"


# ------------------------------------------------------------------ partial files


def remove_partial_files(run_dir: Path, final_names: tuple[str, ...]) -> list[Path]:
    """Delete temp files of atomic writes that a killed run left (call holding the lock).

    In ``cache/`` and ``checkpoints/*/`` (folders only roma-tune writes) every ``.*.tmp``;
    in ``run_dir`` itself only those of ``final_names``. Returns what was deleted.
    """
    run_dir = Path(run_dir)
    found = [p for n in final_names for p in run_dir.glob(f".{n}.*.tmp")]
    for sub in (run_dir / "cache", *(run_dir / CHECKPOINTS_DIRNAME).glob("*")):
        if sub.is_dir():
            found += sub.glob(".*.tmp")
    removed = []
    for p in sorted(found):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ------------------------------------------------------------------ checkpoints


@dataclass
class CheckpointPlan:
    """What the training does with the checkpoints of its configuration."""

    directory: Path
    complete: bool = False  # a finished training exists: reuse it
    resume: bool = False  # load the latest checkpoint
    notes: list[str] = field(default_factory=list)  # lines to tell the user


def plan_checkpoints(
    run_dir: Path, train_key: str, epochs: int, resume: bool, overwrite: bool
) -> CheckpointPlan:
    """Decide what happens to ``RUN_DIR/checkpoints/<train_key>``; create it.

    Refuses (:class:`RunDirError`) to start over an unfinished training without
    ``overwrite``; with it, deletes that training's checkpoints and says so.
    """
    directory = Path(run_dir) / CHECKPOINTS_DIRNAME / train_key
    plan = CheckpointPlan(directory)
    latest = latest_checkpoint(directory)
    done = checkpoint_epoch(latest) + 1 if latest is not None else 0
    legacy = legacy_checkpoints(directory)
    if overwrite:
        old = all_checkpoints(directory)
        if old:
            state = "finished" if done >= epochs else "unfinished"
            for p in old:
                p.unlink()
            plan.notes.append(
                f"--overwrite: deleted {len(old)} checkpoint file(s) of an earlier training of "
                f"this configuration ({state}) in {directory}; training from scratch"
            )
    elif legacy:
        raise RunDirError(
            f"--out {run_dir}: {legacy[-1]} is a checkpoint of an earlier roma-vllm that "
            "cannot be resumed; pass --overwrite to delete it and train again"
        )
    elif latest is not None and done >= epochs:
        plan.complete = plan.resume = True
    elif latest is not None:
        if not resume:
            raise RunDirError(
                f"--out {run_dir}: holds an unfinished training of this configuration "
                f"({done} of {epochs} epochs done, {directory}); pass --resume to continue it "
                "or --overwrite to delete it and start over"
            )
        plan.resume = True
    elif resume:
        plan.notes.append(
            "--resume: no checkpoint of this configuration yet; starting from scratch"
        )
    directory.mkdir(parents=True, exist_ok=True)
    return plan
