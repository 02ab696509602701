"""`--device-map` (a model spread over several devices) and `--dtype auto`.

Without GPUs, ``--device-map auto`` can only place every layer on the CPU; these tests check
that the flag runs end to end there (same deltas as without it), is recorded, and is
refused with torchrun and with ``--device``.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from roma_vllm.deltas import read_deltas
from tuner.cli.app import app
from tuner.config import TuneConfig
from tuner.model.load import resolve_dtype
from tuner.run.pipeline import run

runner = CliRunner()


@pytest.fixture(scope="module")
def cfg(tiny_dir, tmp_path_factory):  # noqa: F811
    data = write_jsonl(tmp_path_factory.mktemp("dm_data") / "train.jsonl", mc_rows(16, seed=5))
    return TuneConfig(
        model=str(tiny_dir),
        data=str(data),
        out="",
        layers="last2",
        lr=3e-2,
        epochs=1,
        batch_size=8,
        seed=2,
    )


def test_device_map_auto_runs_end_to_end_on_cpu(cfg, tmp_path):
    plain = run(dataclasses.replace(cfg, out=str(tmp_path / "plain")))
    mapped = run(dataclasses.replace(cfg, out=str(tmp_path / "mapped"), device_map="auto"))
    a, b = read_deltas(plain.deltas), read_deltas(mapped.deltas)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].abs().max() > 0
        torch.testing.assert_close(b.tensors[name], a.tensors[name], rtol=0, atol=1e-7)
    model = json.loads((tmp_path / "mapped" / "config.json").read_text())["model"]
    assert model["dtype"] == "float32"  # --dtype auto on a CPU
    assert model["devices"] == ["cpu"] and set(model["device_map"].values()) == {"cpu"}
    assert b.training["config"]["device_map"] == "auto"
    assert b.training["model"]["dtype"] == "float32"


def _error(args: list[str], env: dict[str, str] | None = None) -> str:
    result = runner.invoke(app, ["run", "--no-progress", *args], env=env)
    assert result.exit_code == 1, result.output
    return next(line for line in result.output.splitlines() if line.startswith("Error: "))


def test_device_map_is_refused_under_torchrun(cfg, tmp_path):
    args = [
        "--model",
        cfg.model,
        "--data",
        cfg.data,
        "--out",
        str(tmp_path),
        "--device-map",
        "auto",
    ]
    assert _error(args, env={"WORLD_SIZE": "2"}) == (
        "Error: --device-map: spreads one model over every GPU of a single process and cannot "
        "be combined with torchrun (2 processes); use --device-map in one process, or torchrun "
        "with one GPU per process"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--device-map", "auto", "--device", "cpu"],
            "Error: --device-map: decides where each layer goes; leave out --device cpu",
        ),
        (
            ["--device-map", "everywhere"],
            "Error: --device-map: must be one of auto, balanced, sequential, got 'everywhere'",
        ),
        (["--dtype", "fp8"], "Error: --dtype: must be one of auto, bfloat16, float32, got 'fp8'"),
    ],
)
def test_option_errors(cfg, tmp_path, extra, message):
    args = ["--model", cfg.model, "--data", cfg.data, "--out", str(tmp_path), *extra]
    assert _error(args) == message


def test_dtype_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert TuneConfig().dtype == "auto"
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    text = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", result.output))
    assert "'auto' is bfloat16 when training on CUDA and float32 on CPU" in text
