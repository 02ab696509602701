"""Run options for real sizes: micro-batches, --max-length, served precision, --deterministic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from recompute import letter_accuracy, read_rows
from transformers import AutoTokenizer
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401

from roma_vllm.deltas import read_deltas
from tuner.config import TuneConfig
from tuner.data.prompts import Encoded, EncodeError, encode
from tuner.data.sources import load_examples
from tuner.data.truncate import truncate_prompts
from tuner.run.pipeline import run


@pytest.fixture(scope="module")
def cfg(tiny_dir, tmp_path_factory) -> TuneConfig:  # noqa: F811
    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", mc_rows(24, seed=5))
    return TuneConfig(
        model=str(tiny_dir), data=str(data), out="", layers="1-3", lam=0.3, lr=3e-2,
        epochs=2, batch_size=8, dtype="float32", seed=3,
    )  # fmt: skip


def _run(cfg: TuneConfig, tmp: Path, **changes: object):
    return run(dataclasses.replace(cfg, out=str(tmp), **changes))


def test_micro_batches_give_the_same_deltas(cfg, tmp_path):
    whole = _run(cfg, tmp_path / "whole")
    micro = _run(cfg, tmp_path / "micro", micro_batch_size=3)
    a, b = read_deltas(whole.deltas).tensors, read_deltas(micro.deltas).tensors
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].abs().max() > 1e-4  # training moved the routers
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
    for x, y in zip(whole.history, micro.history, strict=True):
        assert x.loss == pytest.approx(y.loss, rel=1e-5)
        assert x.steps == y.steps  # the same number of optimiser steps


def test_truncation_cuts_from_the_left_and_keeps_bos() -> None:
    rows = [
        Encoded([1, 10, 11, 12, 13, 14], [20, 21], None, None, 0),  # 6 tokens
        Encoded([1, 10, 11, 12], None, [[30, 31], [33]], None, 1),  # 4 + 2
        Encoded([10, 11, 12, 13], None, None, [40, 41], None),  # no BOS, 4 + 2
    ]
    out, cut = truncate_prompts(rows, 4, bos_id=1)
    assert cut == 3
    assert out[0].prompt_ids == [1, 12, 13, 14] and out[0].option_ids == [20, 21]
    assert out[1].prompt_ids == [1, 12] and out[1].continuations == [[30, 31], [33]]
    assert out[2].prompt_ids == [12, 13] and out[2].target_ids == [40, 41]
    assert all(e.max_len <= 4 for e in out)


def test_truncation_refuses_a_row_whose_continuation_cannot_fit() -> None:
    rows = [Encoded([1, 10], None, [[30, 31, 32, 33]], None, 0)]
    with pytest.raises(EncodeError, match=r"--max-length 4: row 1 needs 5 tokens"):
        truncate_prompts(rows, 4, bos_id=1)


def test_run_max_length_counts_the_rows_it_cut(cfg, tiny_dir, tmp_path):  # noqa: F811
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    encoded = encode(load_examples(cfg.data).examples, tok, "letter")
    lengths = sorted(e.max_len for e in encoded)
    limit = lengths[-1] - 2  # the longest rows lose two tokens
    expected = sum(n > limit for n in lengths)
    assert expected > 0
    result = _run(cfg, tmp_path / "cut", max_length=limit, epochs=1)
    assert result.truncated == expected
    assert read_deltas(result.deltas).training["data"]["truncated_rows"] == expected


def test_served_precision_is_the_accuracy_of_bf16_routers(cfg, tmp_path):
    from roma_vllm.testing.tiny import build_tiny_model

    bf16 = build_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    result = _run(cfg, tmp_path / "run", model=str(bf16), lr=0.2, epochs=3)
    training = read_deltas(result.deltas).training
    assert training["served_dtype"] == "bfloat16"
    served = training["train_accuracy_served"]
    assert result.served["train_accuracy_served"] == served
    rows = read_rows(cfg.data)
    rounded = letter_accuracy(bf16, rows, result.deltas, router_dtype=torch.bfloat16)
    exact = letter_accuracy(bf16, rows, result.deltas)
    assert rounded.matches(served)
    assert exact.matches(training["train_accuracy_after"])


def test_deterministic_mode_is_on_during_the_run_only(cfg, tmp_path, monkeypatch):
    import tuner.run.pipeline as pipeline

    seen: list[bool] = []
    real = pipeline.train

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    _run(cfg, tmp_path / "det", deterministic=True, epochs=1)
    _run(cfg, tmp_path / "plain", epochs=1)
    assert seen == [True, False]
    assert not torch.are_deterministic_algorithms_enabled()
