"""Run a batch of vLLM engines in ONE process and report greedy tokens, logprobs or errors.

Used by the plugin tests: ``python tests/vllm_jobs.py JOBS.json RESULTS.json``. Each job
starts an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni-process executor):
the loader code path is the same as ``vllm serve``'s, but the start costs seconds instead
of half a minute, because vLLM is imported once and no process is spawned. Errors raised
while loading come back as text. The multi-process path (plugin in every process, errors
from the engine-core subprocess) is covered separately by the ``vllm serve`` tests.

A job: ``{"model", "load_format", "extra", "prompts": [[ids]], "max_tokens", "env",
"probe_routers", "compilation_config", "dtype"}``; a result: ``{"ok": true, "tokens": [[ids]],
"logprobs": [[float]], "routers": {module: [[float]]}, "attention_backend": asked or None}``
or ``{"ok": false, "error": "Type: message"}``. Engines get the attention backend
``roma-tune eval`` asks for (:mod:`roma_vllm.attention_backend`).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

PROBE_ROWS = 3


def probe_input(hidden: int):  # the tests rebuild the same input
    import torch

    return torch.randn(PROBE_ROWS, hidden, generator=torch.Generator().manual_seed(0))


def probe_routers(model) -> dict[str, list]:
    """Each router module's output on a fixed input: shows the weights vLLM really serves.

    Routers are the linear modules named ``gate`` or ``router``; on CPU their weights are
    repacked for oneDNN after loading, so calling the module is the way to read them.
    """
    import torch

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            size = getattr(module, "input_size", None)
            if name.rsplit(".", 1)[-1] not in ("gate", "router") or size is None:
                continue
            y = module(probe_input(size).to(torch.get_default_dtype()))
            out[name] = (y[0] if isinstance(y, tuple) else y).float().tolist()
    return out


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    from roma_vllm.attention_backend import attention_backend

    saved = {k: os.environ.get(k) for k in job.get("env", {})}
    os.environ.update(job.get("env", {}))
    t0 = time.perf_counter()
    llm = None
    try:
        dtype = job.get("dtype", "float32")
        backend = attention_backend(job["model"], dtype)  # as `roma-tune eval` asks
        llm = LLM(
            job["model"],
            load_format=job.get("load_format", "auto"),
            model_loader_extra_config=job.get("extra") or {},
            dtype=dtype,
            **({"attention_backend": backend} if backend else {}),
            enforce_eager=True,
            max_model_len=256,
            seed=0,
            distributed_executor_backend="uni",
            compilation_config=job.get("compilation_config"),
        )
        params = SamplingParams(
            temperature=0.0, max_tokens=job.get("max_tokens", 8), logprobs=1, ignore_eos=True
        )
        outs = llm.generate(
            [{"prompt_token_ids": ids} for ids in job["prompts"]], params, use_tqdm=False
        )
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [
            [
                step[tok].logprob
                for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)
            ]
            for o in outs
        ]
        result = {"ok": True, "tokens": tokens, "logprobs": logprobs, "attention_backend": backend}
        if job.get("probe_routers"):
            result["routers"] = llm.apply_model(probe_routers)[0]
        return {**result, "seconds": time.perf_counter() - t0}
    except Exception as e:  # the error text is what the tests check
        return {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-4000:],
            "seconds": time.perf_counter() - t0,
        }
    finally:
        del llm
        gc.collect()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(jobs_path: str, results_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = {}
    for name, job in jobs.items():
        results[name] = run_job(job)
        print(f"vllm_jobs: {name}: ok={results[name]['ok']}", file=sys.stderr, flush=True)
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
