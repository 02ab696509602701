"""Data parallel `roma-tune run` under torchrun: 2 processes (gloo, CPU) give the deltas of
1 process with the same global batch size, and only rank 0 writes and reports."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401

from roma_vllm.deltas import read_deltas
from tuner.config import TuneConfig
from tuner.data.prompts import encode
from tuner.data.sources import load_examples
from tuner.model.forward import collate
from tuner.model.load import load_model
from tuner.model.routing import RoutingCapture
from tuner.run.pipeline import run
from tuner.train.distributed import SINGLE, Dist, shard
from tuner.train.loop import train_step

# 22 samples in global batches of 7: 7, 7, 7, 1. The strided shards are uneven (4 + 3) and
# in the last batch rank 1 has no sample at all; it must still join the gradient sum.
N_SAMPLES, BATCH = 22, 7


@pytest.fixture(scope="module")
def cfg(tiny_dir, tmp_path_factory):  # noqa: F811
    data = write_jsonl(tmp_path_factory.mktemp("ddp_data") / "train.jsonl", mc_rows(N_SAMPLES))
    return TuneConfig(
        model=str(tiny_dir),
        data=str(data),
        out="",
        layers="1-3",
        lam=0.5,
        lr=3e-2,
        epochs=2,
        batch_size=BATCH,
        warmup=0.2,
        cache_frozen_layers=True,  # rank 0 builds it, rank 1 reads it
        seed=1,
    )


def _torchrun(cfg: TuneConfig, nproc: int) -> subprocess.CompletedProcess:
    tune = Path(sys.executable).parent / "roma-tune"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    args += [f"--nproc-per-node={nproc}", "--no-python", str(tune), "run", "--no-progress"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--lambda" if f.name == "lam" else "--" + f.name.replace("_", "-")
        if value is None or value == f.default:
            continue
        args += [flag] if value is True else [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # starts torchrun: two fresh Pythons importing torch and transformers
def test_two_processes_give_the_deltas_of_one(cfg, tmp_path):
    one = run(dataclasses.replace(cfg, out=str(tmp_path / "one")))
    two_dir = tmp_path / "two"
    # Reuse the task embeddings (rank 0 still loads and broadcasts them): importing
    # sentence-transformers again would take most of this test's time.
    (two_dir / "cache").mkdir(parents=True)
    for f in (tmp_path / "one" / "cache").glob("embeddings-*.npy"):
        shutil.copy(f, two_dir / "cache" / f.name)
    proc = _torchrun(dataclasses.replace(cfg, out=str(two_dir)), 2)
    assert proc.returncode == 0, proc.stderr[-4000:]

    a, b = read_deltas(one.deltas), read_deltas(two_dir)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].abs().max() > 1e-3  # the routers really moved
        # Not bit-exact: a rank pads its shard to the shard's longest row, not the global
        # batch's, and the two half-gradients are summed instead of one mean being taken,
        # so matmuls see other shapes and float32 sums another order (~1e-7 relative per
        # step). 7 AdamW steps keep that far below 1e-5 of the deltas' scale.
        torch.testing.assert_close(b.tensors[name], a.tensors[name], rtol=1e-4, atol=2e-5)

    # the snapshot passes are split by whole batches: bit-identical accuracy and epochs
    tb = b.training
    assert tb["train_accuracy_before"] == one.accuracy_before
    assert tb["train_accuracy_after"] == one.accuracy_after
    assert [e["successful"] for e in tb["epochs"]] == [r.successful for r in one.history]
    for got, want in zip(tb["epochs"], one.history, strict=True):
        assert got["steps"] == want.steps == 4
        assert got["loss"] == pytest.approx(want.loss, rel=1e-5)
    assert tb["model"]["world_size"] == 2 and a.training["model"]["world_size"] == 1

    # rank 0 alone writes, logs and prints
    log = (two_dir / "train_log.jsonl").read_text()
    assert log.count('"event": "start"') == 1 and log.count('"event": "epoch"') == 2
    assert json.loads((two_dir / "config.json").read_text())["model"]["world_size"] == 2
    assert proc.stdout.count("train accuracy:") == 1
    assert proc.stderr.count("snapshot: train accuracy") == 1


def test_shards_cover_the_batch_once():
    idx = [5, 3, 9, 1, 7, 2, 8]
    parts = [shard(idx, Dist(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[5, 1, 8], [3, 7], [9, 2]]
    assert shard(idx, SINGLE) == idx


@pytest.mark.parametrize("size", [7, 1])  # 4 + 3 samples; 1 + 0 (rank 1's shard is empty)
def test_scaled_shard_gradients_sum_to_the_global_batch_gradient(tiny_dir, tmp_path, size):  # noqa: F811
    """The loss normalisation of train_step(scale=shard/global): what the all-reduce sums
    is the single-process gradient of the global batch mean."""
    tm = load_model(str(tiny_dir), layers="1-3", dtype="float32", device="cpu")
    rows = write_jsonl(tmp_path / "rows.jsonl", mc_rows(size, seed=9))
    encoded = encode(load_examples(str(rows)).examples, tm.tokenizer, "letter")
    g = torch.Generator().manual_seed(0)
    dim = len(tm.layers) * tm.num_experts
    targets = torch.softmax(torch.randn(size, 3, dim, generator=g), -1)
    weights = torch.softmax(torch.randn(size, 3, generator=g), -1)
    idx = list(range(size))
    pad = tm.tokenizer.pad_token_id

    def grads(samples: list[int], scale: float) -> list[torch.Tensor]:
        for p in tm.parameters():
            p.grad = None
        if samples:
            batch = collate(encoded, samples, pad)
            with RoutingCapture(tm) as cap:
                train_step(tm, batch, targets[samples], weights[samples], 0.7, cap, scale=scale)
        return [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in tm.parameters()
        ]

    whole = grads(idx, 1.0)
    summed = [torch.zeros_like(w) for w in whole]
    for r in range(2):
        mine = shard(idx, Dist(rank=r, world_size=2))
        for acc, gr in zip(summed, grads(mine, len(mine) / size), strict=True):
            acc += gr
    assert all(w.abs().max() > 0 for w in whole)
    for a, b in zip(summed, whole, strict=True):
        # float32 rounding only (other padded widths, another summation order): ~1e-7 of
        # the gradient's scale, far below any real difference in normalisation (>= 1/7)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
