"""The run checks that the model fits before loading it (tuner.model.memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tuner_fixtures import tiny_dir  # noqa: F401
from typer.testing import CliRunner

from roma_vllm.testing.olmoe_7b import write_sparse_checkpoint
from tuner.cli import app
from tuner.model.memory import (
    GIB,
    MemoryPlanError,
    checkpoint_numel,
    needed_bytes,
    plan_dtype,
)

CPU = torch.device("cpu")


def test_numel_from_headers_equals_the_loaded_tensors(tiny_dir: Path) -> None:  # noqa: F811
    total = 0
    for f in tiny_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            total += sum(st.get_tensor(n).numel() for n in st.keys())  # noqa: SIM118
    assert checkpoint_numel(tiny_dir) == total


def test_auto_falls_back_to_bfloat16_on_cpu_and_says_so(tiny_dir: Path) -> None:  # noqa: F811
    n = checkpoint_numel(tiny_dir)
    between = (needed_bytes(n, "float32") + needed_bytes(n, "bfloat16")) // 2
    said: list[str] = []
    assert plan_dtype("auto", CPU, tiny_dir, said.append, available=10 * GIB) == "float32"
    assert said == []
    assert plan_dtype("auto", CPU, tiny_dir, said.append, available=between) == "bfloat16"
    assert len(said) == 1 and "bfloat16" in said[0] and "--dtype auto" in said[0]
    with pytest.raises(MemoryPlanError, match=r"--dtype bfloat16, --device-map auto"):
        plan_dtype("float32", CPU, tiny_dir, available=between)
    with pytest.raises(MemoryPlanError, match=r"in bfloat16 need .* use --device-map auto"):
        plan_dtype("auto", CPU, tiny_dir, available=needed_bytes(n, "bfloat16") - 1)


def test_a_float32_7b_run_is_refused_with_one_line(tmp_path: Path) -> None:
    """The real OLMoE-1B-7B shape in float32 (27.6 GB of weights) on this machine: one line,
    before a single weight is read (the checkpoint is a sparse file)."""
    model = write_sparse_checkpoint(tmp_path / "olmoe-7b", "float32")
    assert 6.8e9 < checkpoint_numel(model) < 7.0e9
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n' * 4)
    args = ["run", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert "6.92B weights in float32 need" in lines[-1] and "--dtype bfloat16" in lines[-1]
