"""Kill safety: `roma-tune run` SIGKILLed in the middle of an epoch leaves only whole files
under final names, and `--resume` then gives exactly the deltas of an uninterrupted run.
Every write in tuner/ goes through an atomic write (temp file in the same folder + rename)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tuner_fixtures import mc_rows, run_args, tiny_dir, write_jsonl  # noqa: F401

from roma_vllm.deltas import DELTAS_FILENAME, read_deltas
from tuner.config import TuneConfig
from tuner.model.frozen_cache import PrefixCache
from tuner.run.workdir import LOCK_FILENAME
from tuner.train.checkpoints import checkpoint_epoch, latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parent.parent
TUNE = Path(sys.executable).parent / "roma-tune"
EPOCHS = 6


@pytest.fixture(scope="module")
def cfg(tiny_dir, tmp_path_factory):  # noqa: F811
    data = write_jsonl(tmp_path_factory.mktemp("kill_data") / "train.jsonl", mc_rows(48, seed=7))
    return TuneConfig(
        model=str(tiny_dir), data=str(data), out="", layers="1-3", lam=0.3, lr=3e-2,
        epochs=EPOCHS, batch_size=4, warmup=0.2, dtype="float32", cache_frozen_layers=True,
        seed=3,
    )  # fmt: skip


def _command(cfg: TuneConfig, *extra: str) -> list[str]:
    return [str(TUNE), *run_args(cfg, *extra)]


# The same environment for every run, so that all of them compute alike.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _tune(cfg: TuneConfig, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _command(cfg, *extra), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _kill_mid_epoch(cfg: TuneConfig, run_dir: Path) -> int:
    """Start the run, SIGKILL it halfway through the epoch after its first checkpoint;
    returns the last finished epoch."""
    proc = subprocess.Popen(
        _command(cfg), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not list(run_dir.glob("checkpoints/*/epoch-*.safetensors")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
        first = next(e for e in _events(run_dir) if e["event"] == "epoch")
        time.sleep(first["seconds"] / 2)  # into the middle of the next epoch
        assert proc.poll() is None, "the run ended before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    done = [e["epoch"] for e in _events(run_dir) if e["event"] == "epoch"]
    assert done and done[-1] < EPOCHS - 1, done
    return done[-1]


def _assert_only_whole_files(run_dir: Path) -> None:
    """Every file under a final name reads back whole; only ``.NAME.*.tmp`` may be partial."""
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        name, rel = path.name, path.relative_to(run_dir)
        if name.startswith(".") and name.endswith(".tmp"):
            continue  # a temp file of an interrupted atomic write: never read as output
        if name == LOCK_FILENAME:
            assert json.loads(path.read_text())["pid"] > 0
        elif name == DELTAS_FILENAME:
            assert read_deltas(path).layers == [1, 2, 3]
        elif name == "config.json":
            assert json.loads(path.read_text())["config"]["epochs"] == EPOCHS
        elif name == "train_log.jsonl":
            assert all(json.loads(line) for line in path.read_text().splitlines())
        elif name.startswith("embeddings-") and name.endswith(".npy"):
            assert np.load(path).shape[0] == 48
        elif name.startswith("prefix-") and name.endswith(".bin.json"):
            index = json.loads(path.read_text())
            data = path.with_name(name[: -len(".json")])
            assert PrefixCache.open(data) is not None
            assert data.stat().st_size == index["elements"] * 4  # float32
        elif name.startswith("prefix-") and name.endswith(".bin"):
            continue  # checked with its index (written after it)
        elif name.startswith("snapshot-") and name.endswith(".safetensors"):
            assert load_file(str(path))["routing"].shape[0] == 48
        elif name.startswith("neighbours-") and name.endswith(".npz"):
            with np.load(path) as z:
                assert z["index"].shape[0] == 48
        elif rel.parts[0] == "checkpoints" and name.endswith(".safetensors"):
            state = load_checkpoint(path)
            assert state.epoch == checkpoint_epoch(path)
            assert len(state.history) == state.epoch + 1
        else:
            raise AssertionError(f"unexpected file {rel}")


@pytest.mark.slow  # three `roma-tune run` processes
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(cfg, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _tune(dataclasses.replace(cfg, out=str(whole)))
    expected = read_deltas(whole)
    # The killed run takes the task embeddings from the cache (loading the embedder would
    # only add time); everything else it computes itself.
    (killed / "cache").mkdir(parents=True)
    for f in (whole / "cache").glob("embeddings-*.npy"):
        shutil.copy(f, killed / "cache" / f.name)

    last = _kill_mid_epoch(dataclasses.replace(cfg, out=str(killed)), killed)
    assert not (killed / DELTAS_FILENAME).exists()
    _assert_only_whole_files(killed)
    ckpt = latest_checkpoint(next((killed / "checkpoints").iterdir()))
    assert ckpt is not None and checkpoint_epoch(ckpt) == last

    _tune(dataclasses.replace(cfg, out=str(killed)), "--resume")
    resumed = read_deltas(killed)
    assert sorted(resumed.tensors) == sorted(expected.tensors)
    for name in expected.tensors:
        assert torch.equal(resumed.tensors[name], expected.tensors[name]), name
    events = _events(killed)
    assert [e["from_epoch"] for e in events if e["event"] == "resume"] == [last]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(last + 1, EPOCHS))
    timing = ("seconds", "samples_per_second")
    strip = lambda epochs: [{k: v for k, v in e.items() if k not in timing} for e in epochs]  # noqa: E731
    assert strip(resumed.training["epochs"]) == strip(expected.training["epochs"])
    _assert_only_whole_files(killed)
    assert not (killed / LOCK_FILENAME).exists()


# ------------------------------------------------------------------ every write is atomic

# Calls that write a file -> the position of the argument naming it ("owner": the object
# the method is called on). np.save names its file first, torch.save second.
WRITERS: dict[str, int | str] = {
    "save": 1,
    "save_file": 1,
    "savez": 0,
    "savez_compressed": 0,
    "savefig": 0,
    "save_pretrained": 0,
    "to_csv": 0,
    "copy": 1,
    "copy2": 1,
    "copyfile": 1,
    "copytree": 1,
    "write_text": "owner",
    "write_bytes": "owner",
}
FIRST_ARG = {"np.save", "numpy.save"}
# (file, what is written) that is atomic another way, or not an output, with the reason.
EXEMPT = {
    ("tuner/export/merge.py", "str(dst)"): (
        "a shard in the temp folder that _move_into_place renames onto --out once whole"
    ),
    ("tuner/export/merge.py", "dst"): "a file in the same temp folder",
    ("tuner/export/merge.py", "target"): "a file in the same temp folder",
    ("tuner/evaluate/backends/vllm_log.py", "self.path"): (
        "appends vLLM's console output to its own mkstemp log file while the engine runs"
    ),
}


def _target(call: ast.Call) -> ast.AST | None:
    """What ``call`` writes to, when it writes a file."""
    func = call.func
    if isinstance(func, ast.Attribute):
        name, owner = func.attr, func.value
    elif isinstance(func, ast.Name):
        name, owner = func.id, None
    else:
        return None
    if name == "open":  # open(path, mode) or path.open(mode)
        args = call.args if owner is None else [owner, *call.args]
        mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
        mode = mode if mode is not None else (args[1] if len(args) > 1 else None)
        writes = isinstance(mode, ast.Constant) and bool(set(str(mode.value)) & set("wax+"))
        return args[0] if writes and args else None
    where = 0 if ast.unparse(func) in FIRST_ARG else WRITERS.get(name)
    if where is None:
        return None
    if where == "owner":
        return owner
    return call.args[where] if len(call.args) > where else None  # type: ignore[operator]


def test_every_write_in_tuner_is_atomic():
    """A file is written under a temp name that atomic_write (or a temp folder) renames into
    place, or into memory (``buf``): never straight under its final name."""
    bare, checked = [], 0
    for path in sorted((REPO / "tuner").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or (target := _target(node)) is None:
                continue
            checked += 1
            text = ast.unparse(target)
            if "tmp" in text or text == "buf" or (rel, text) in EXEMPT:
                continue
            bare.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert checked >= 8  # the scan sees the writes (checkpoints, caches, logs, reports ...)
    assert bare == []
