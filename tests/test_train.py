"""Training end to end on a tiny model: accuracy improves, the delta file is exact, --resume
after a killed run equals an uninterrupted run, and unchanged stages are reused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from recompute import letter_accuracy, read_rows
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401

import tuner.train.loop
from roma_vllm.deltas import read_deltas
from roma_vllm.hf import apply_deltas
from tuner.config import TuneConfig
from tuner.model.load import load_model
from tuner.run.pipeline import run
from tuner.train.checkpoints import load_checkpoint
from tuner.train.loop import warmup_factor


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def base_cfg(tiny_dir, tmp_path_factory):  # noqa: F811
    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", mc_rows(32))
    return TuneConfig(
        model=str(tiny_dir),
        data=str(data),
        out="",
        layers="1-3",
        lam=0.1,
        lr=3e-2,
        epochs=3,
        batch_size=8,
        warmup=0.2,
        dtype="float32",
        cache_frozen_layers=True,
        seed=1,
    )


@pytest.fixture(scope="module")
def uninterrupted(base_cfg, tmp_path_factory):
    cfg = dataclasses.replace(base_cfg, out=str(tmp_path_factory.mktemp("run_a")))
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def recomputed(uninterrupted, tiny_dir):  # noqa: F811
    """Train accuracy of the base and of base + saved deltas, from a fresh forward."""
    cfg, result = uninterrupted
    rows = read_rows(cfg.data)
    return letter_accuracy(tiny_dir, rows), letter_accuracy(tiny_dir, rows, result.deltas)


def test_end_to_end_improves_train_accuracy(uninterrupted, recomputed):
    _, result = uninterrupted
    before, after = recomputed
    assert after.accuracy > before.accuracy  # the saved deltas improve a fresh model
    assert before.matches(result.accuracy_before), (before.accuracy, result.accuracy_before)
    assert after.matches(result.accuracy_after), (after.accuracy, result.accuracy_after)
    assert after.matches(result.history[-1].train_accuracy)
    assert [r.epoch for r in result.history] == [0, 1, 2]


def test_delta_file_holds_exactly_the_tuned_routers(uninterrupted, recomputed, tiny_dir):  # noqa: F811
    cfg, result = uninterrupted
    deltas = read_deltas(result.deltas)
    assert sorted(deltas.tensors) == [f"model.layers.{i}.mlp.gate.weight" for i in (1, 2, 3)]
    assert deltas.layers == [1, 2, 3] and deltas.max_abs() > 0
    t = deltas.training
    assert t["config"]["lam"] == 0.1 and t["data"]["examples"] == 32
    assert t["base_fingerprint"] and len(t["epochs"]) == 3
    assert {"loss", "task_loss", "manifold", "train_accuracy"} <= set(t["epochs"][0])
    before, after = recomputed  # the recorded accuracies are those of a fresh forward
    assert before.matches(t["train_accuracy_before"])
    assert after.matches(t["train_accuracy_after"])
    # applying the deltas to the base reproduces the tuned routers (float32 masters)
    tuned = load_checkpoint(next((result.run_dir / "checkpoints").rglob("epoch-2.safetensors")))
    base = load_model(str(tiny_dir), layers="all", dtype="float32", device="cpu")
    apply_deltas(base.model, deltas)
    for i in range(4):
        name = f"model.layers.{i}.mlp.gate.weight"
        got = base.tuned[name].detach()
        if i == 0:
            torch.testing.assert_close(got, base.base[name].float(), rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, tuned.routers[name], rtol=0, atol=1e-7)
    assert (result.run_dir / "config.json").is_file()
    assert (result.run_dir / "train_log.jsonl").read_text().count('"event": "epoch"') == 3


def test_resume_after_a_killed_run_equals_uninterrupted(uninterrupted, base_cfg, tmp_path):
    _, expected = uninterrupted
    cfg = dataclasses.replace(base_cfg, out=str(tmp_path))

    def kill(epoch: int) -> None:
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        run(cfg, on_epoch_end=kill)
    assert not (tmp_path / "roma_deltas.safetensors").exists()  # no half-written output
    resumed = run(dataclasses.replace(cfg, resume=True))
    assert [r.epoch for r in resumed.history] == [0, 1, 2]
    a, b = read_deltas(expected.deltas), read_deltas(resumed.deltas)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=0)
    assert resumed.accuracy_after == expected.accuracy_after


def test_unchanged_stages_are_reused(uninterrupted, monkeypatch):
    cfg, first = uninterrupted
    a = read_deltas(first.deltas)  # read before the second run rewrites the file
    ckpts = sorted((first.run_dir / "checkpoints").rglob("*.safetensors"))
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpts]
    steps = []
    real_step = tuner.train.loop.train_step
    monkeypatch.setattr(
        tuner.train.loop, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k)
    )
    again = run(cfg)
    assert set(again.reused) >= {"embeddings", "prefix", "snapshot", "neighbours", "training"}
    # training was skipped: no training step ran and no checkpoint was written again
    assert steps == []
    assert ckpts and [(p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpts] == stamps
    b = read_deltas(again.deltas)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=0)


def test_warmup_factor():
    assert [warmup_factor(s, 10, 0.3) for s in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert warmup_factor(0, 10, 0.0) == 1.0


def test_refresh_never_keeps_the_initial_targets(base_cfg, tmp_path, tiny_dir):  # noqa: F811
    cfg = dataclasses.replace(
        base_cfg, out=str(tmp_path), refresh="never", epochs=2, limit=16, layers="last1",
        cache_frozen_layers=False,
    )  # fmt: skip
    result = run(cfg)
    first, second = result.history
    assert first.train_accuracy is None  # no re-measurement between epochs
    after = letter_accuracy(tiny_dir, read_rows(cfg.data, limit=16), result.deltas)
    assert after.matches(second.train_accuracy) and after.matches(result.accuracy_after)
    assert first.successful == second.successful
    assert read_deltas(result.deltas).layers == [3]
