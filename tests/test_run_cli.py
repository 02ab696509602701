"""`roma-tune run` through the CLI: every flag documented, --lambda 0 vs > 0, clear errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from recompute import letter_accuracy, read_rows
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from roma_vllm.deltas import read_deltas
from tuner.cli.app import app
from tuner.config import TuneConfig

runner = CliRunner()

FLAGS = {
    "lam": "--lambda",
}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _run(*args: str) -> object:
    return runner.invoke(app, ["run", "--no-progress", *args])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("cli") / "train.jsonl", mc_rows(16, seed=3))


def test_help_documents_every_option():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    for f in dataclasses.fields(TuneConfig):
        assert _flag(f.name) in text, f.name
    assert "--resume" in text and "--cache-frozen-layers" in text and "--progress" in text


def test_lambda_zero_and_positive_give_different_deltas(tiny_dir, data, tmp_path):  # noqa: F811
    common = ["--model", str(tiny_dir), "--data", str(data), "--epochs", "1", "--batch-size", "8"]
    common += ["--lr", "3e-2", "--layers", "last2", "--dtype", "float32", "--warmup", "0"]
    results = {}
    for lam in ("0", "1.0"):
        out = tmp_path / f"lam{lam}"
        val = ["--val", str(data)] if lam != "0" else []
        result = _run(*common, "--lambda", lam, "--out", str(out), *val)
        assert result.exit_code == 0, result.output
        assert "train accuracy:" in result.output and "deltas:" in result.output
        results[lam] = read_deltas(out)
        config = json.loads((out / "config.json").read_text())
        assert config["config"]["lam"] == float(lam)
    plain, roma = results["0"], results["1.0"]
    assert plain.training["method"] == "router-tuning" and roma.training["method"] == "roma"
    # validation accuracy as a fresh forward computes it: base, and base + the saved deltas
    rows = read_rows(data)
    before = letter_accuracy(tiny_dir, rows)
    after = letter_accuracy(tiny_dir, rows, tmp_path / "lam1.0")
    assert before.matches(roma.training["val_accuracy_before"])
    assert after.matches(roma.training["val_accuracy_after"])
    assert after.matches(roma.training["epochs"][0]["val_accuracy"])
    assert plain.training["val_accuracy_before"] is None
    assert plain.training["epochs"][0]["manifold"] > 0  # measured, just not trained on
    assert sorted(plain.tensors) == sorted(roma.tensors)
    assert any(not torch.equal(plain.tensors[n], roma.tensors[n]) for n in plain.tensors)


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_rows_and_empty_data_stop_the_run(tiny_dir, tmp_path):  # noqa: F811
    rows = mc_rows(8)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:2], {"question": "q", "choices": ["a", "b"]}])
    args = ["--model", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "o")]
    assert _error(_run(*args)) == f"Error: {bad}:3: field 'answer': missing"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    msg = _error(_run("--model", str(tiny_dir), "--data", str(empty), "--out", str(tmp_path / "o")))
    assert msg.startswith(f"Error: {empty}: no usable rows")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--layers", "2,7"],
            "Error: --layers: layer(s) [7] have no MoE router; MoE layers of this model: 0-3",
        ),
        (
            ["--layers", "last9"],
            "Error: --layers: last9 asks for 9 layers but the model has 4 MoE layers",
        ),
        (["--k", "0"], "Error: --k: must be at least 1, got 0"),
        (["--scoring", "cloze"], "Error: --scoring: must be one of letter, loglik, got 'cloze'"),
        (
            ["--routing-vector", "logits"],
            "Error: --routing-vector: must be one of probs, log-probs, got 'logits'",
        ),
        (
            ["--embedder", "no-such-embedder"],
            "Error: --embedder: unknown embedder 'no-such-embedder'",
        ),
    ],
)
def test_option_errors(tiny_dir, data, tmp_path, monkeypatch, extra, message):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o"), *extra]
    assert _error(_run(*args)).startswith(message)


def test_model_without_routers(tmp_path, data):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    msg = _error(
        _run("--model", str(tmp_path / "llama"), "--data", str(data), "--out", str(tmp_path / "o"))
    )
    assert msg == (
        "Error: LlamaForCausalLM: config has no routed experts (no num_experts / "
        "num_local_experts / n_routed_experts / moe_num_experts, also not in text_config): "
        "not an MoE model"
    )


def test_no_successful_sample(tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    import tuner.run.ranks

    real = tuner.run.ranks.take_snapshot

    def nothing_right(*args, **kwargs):
        snap = real(*args, **kwargs)
        snap.correct[:] = False
        return snap

    monkeypatch.setattr(tuner.run.ranks, "take_snapshot", nothing_right)
    args = ["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    msg = _error(_run(*args, "--dtype", "float32"))
    assert msg.startswith(
        f"Error: {data}: the model answers none of the 16 training samples correctly"
    )
    assert "--template" in msg and "--lambda 0" in msg
