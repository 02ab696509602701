"""The run directory: one run at a time (a lock naming its holder, which a killed run does
not leave behind), and an unfinished training never deleted unasked (--resume continues it,
--overwrite deletes it and says so)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from tuner_fixtures import mc_rows, run_args, tiny_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

import tuner.train.loop
from roma_vllm.deltas import read_deltas
from tuner.cli.app import app
from tuner.config import TuneConfig
from tuner.run.pipeline import run
from tuner.run.workdir import LOCK_FILENAME, RunDirError, RunLock
from tuner.train.checkpoints import latest_checkpoint, load_checkpoint

runner = CliRunner()
TUNE = Path(sys.executable).parent / "roma-tune"


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def cfg(tiny_dir, tmp_path_factory):  # noqa: F811
    data = write_jsonl(tmp_path_factory.mktemp("rundir_data") / "train.jsonl", mc_rows(24))
    return TuneConfig(
        model=str(tiny_dir), data=str(data), out="", layers="2-3", lam=0.1, lr=3e-2, epochs=3,
        batch_size=8, warmup=0.2, dtype="float32", seed=4,
    )  # fmt: skip


def _errors(result) -> list[str]:
    """The ``Error:`` lines of a failed command (which must have no traceback)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("Error: ")]


def _text(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return re.sub(r"\s+", " ", result.output)


@pytest.fixture(scope="module")
def uninterrupted(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return read_deltas(run(dataclasses.replace(cfg, out=str(out))).deltas)


def _interrupted(cfg: TuneConfig, out: Path) -> Path:
    """A run stopped after its first epoch; returns its checkpoint."""

    def stop(epoch: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run(dataclasses.replace(cfg, out=str(out)), on_epoch_end=stop)
    ckpt = latest_checkpoint(next((out / "checkpoints").iterdir()))
    assert ckpt is not None and ckpt.name == "epoch-0.safetensors"
    return ckpt


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same(a, b) -> None:
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name


def test_unfinished_training_is_refused_then_resumed(cfg, uninterrupted, tmp_path):
    out = tmp_path / "run"
    ckpt = _interrupted(cfg, out)
    before = _digest(ckpt)
    config_before = (out / "config.json").read_text()
    c = dataclasses.replace(cfg, out=str(out))

    result = runner.invoke(app, run_args(c))
    assert _errors(result) == [
        f"Error: --out {out}: holds an unfinished training of this configuration (1 of 3 "
        f"epochs done, {ckpt.parent}); pass --resume to continue it or --overwrite to delete "
        "it and start over"
    ]
    assert _digest(ckpt) == before  # nothing deleted, nothing rewritten
    assert (out / "config.json").read_text() == config_before
    assert not (out / "roma_deltas.safetensors").exists()

    result = runner.invoke(app, run_args(c, "--resume"))
    assert result.exit_code == 0, result.output
    _assert_same(read_deltas(out), uninterrupted)
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["from_epoch"] for e in events if e["event"] == "resume"] == [0]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]  # 0 was not redone


def test_overwrite_deletes_the_unfinished_training_and_says_so(cfg, uninterrupted, tmp_path):
    out = tmp_path / "run"
    ckpt = _interrupted(cfg, out)
    # partial files a killed run could leave, and files of the user's that must stay
    partial = [out / ".config.json.k3j9x2.tmp", out / "cache" / ".neighbours-ab.npz.q1w2e3.tmp"]
    for p in partial:
        p.write_bytes(b"half")
    kept = [out / "notes.txt", out / ".draft.tmp"]
    for p in kept:
        p.write_text("mine")

    result = runner.invoke(app, run_args(dataclasses.replace(cfg, out=str(out)), "--overwrite"))
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert (
        f"--overwrite: deleted 1 checkpoint file(s) of an earlier training of this "
        f"configuration (unfinished) in {ckpt.parent}; training from scratch"
    ) in text
    assert "removed 2 partial file(s) an interrupted run left in" in text
    assert ".config.json.k3j9x2.tmp" in text and "cache/.neighbours-ab.npz.q1w2e3.tmp" in text
    assert not any(p.exists() for p in partial)
    assert all(p.read_text() == "mine" for p in kept)
    _assert_same(read_deltas(out), uninterrupted)  # trained from scratch: same as uninterrupted
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "resume"]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [0, 1, 2]
    final = load_checkpoint(latest_checkpoint(ckpt.parent))
    assert final.epoch == 2 and len(final.history) == 3


def test_finished_training_is_reused_without_flags(cfg, tmp_path, monkeypatch):
    c = dataclasses.replace(cfg, out=str(tmp_path), epochs=1)
    steps: list[int] = []
    real_step = tuner.train.loop.train_step
    monkeypatch.setattr(
        tuner.train.loop, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k)
    )
    first = run(c)
    trained = len(steps)
    assert trained > 0  # the spy sees the training steps
    first_deltas = read_deltas(first.deltas)  # before the second run rewrites the file
    assert not (tmp_path / LOCK_FILENAME).exists()  # released and removed after the run
    again = run(c)
    assert "training" in again.reused
    assert len(steps) == trained  # no training step on the second run
    _assert_same(first_deltas, read_deltas(again.deltas))


def _holder(out: Path, timeout: float = 120) -> dict:
    path = out / LOCK_FILENAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"{path} never held a holder")


@pytest.mark.slow  # starts `roma-tune run` in a second process
def test_second_run_on_the_same_directory_is_refused_naming_the_holder(cfg, tmp_path):
    out = tmp_path / "busy"
    # long enough to still hold the directory when the second run starts
    first_cfg = dataclasses.replace(cfg, out=str(out), epochs=40, batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [str(TUNE), *run_args(first_cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = datetime.now().replace(microsecond=0)
        holder = _holder(out)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        since = datetime.fromisoformat(holder["since"])
        assert started.timestamp() - 1 <= since.timestamp() <= time.time()

        result = runner.invoke(app, run_args(dataclasses.replace(cfg, out=str(out))))
        assert (
            result.output.strip().splitlines()
            == _errors(result)
            == [
                f"Error: --out {out}: in use by another roma-tune run (pid {first.pid} on "
                f"{socket.gethostname()}, since {holder['since']}); wait for it to finish or "
                "choose another --out"
            ]
        )
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.kill()
        first.wait()


_HOLD = """
import sys, time
from tuner.run.workdir import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(
            RunDirError, match=rf"in use by another roma-tune run \(pid {child.pid} "
        ):
            RunLock(tmp_path).acquire()
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.wait()
    stale = json.loads((tmp_path / LOCK_FILENAME).read_text())
    assert stale["pid"] == child.pid  # the dead holder's file is still there ...
    with RunLock(tmp_path) as lock:  # ... and does not block
        assert lock.held
        assert json.loads((tmp_path / LOCK_FILENAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILENAME).exists()
