"""Measurement, base against roma: throughput on two live engines, engine start-up and model
load time, and a load test through ``vllm serve``; every measure alternates the variants."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import vllm_load_timers
from bench.serving.setup import DTYPE, engine_kwargs


def compare(base: list[float], roma: list[float], higher_is_better: bool) -> dict:
    """Best-of-N and medians of alternating samples; ratios are roma / base.

    Best of N (max rate, min time) is the figure least touched by other jobs' load, which
    only ever slows a run down; the median of per-round ratios compares neighbours in time.
    """
    best = max if higher_is_better else min
    return {
        "base": [round(x, 3) for x in base],
        "roma": [round(x, 3) for x in roma],
        "best": {"base": round(best(base), 3), "roma": round(best(roma), 3)},
        "median": {
            "base": round(statistics.median(base), 3),
            "roma": round(statistics.median(roma), 3),
        },
        "ratio_best": round(best(roma) / best(base), 4),
        "ratio_median": round(statistics.median(r / b for b, r in zip(base, roma, strict=True)), 4),
    }


# -- engines in worker processes (throughput) ---------------------------------------------


def _throughput_worker(
    conn: Any, model: str, variant: dict, prompts: list, max_tokens: int
) -> None:
    """Holds one in-process engine; on each "run" generates the batch and reports its time."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs(variant))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch[:2], params, use_tqdm=False)  # warm-up
    conn.send("ready")
    while conn.recv() == "run":
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(batch, params, use_tqdm=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        first = [list(o.outputs[0].token_ids[:8]) for o in outs[:4]]
        conn.send({"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "first_tokens": first})
    conn.close()


def bench_throughput(model: str, deltas: str, rounds: int, n_prompts: int, max_tokens: int) -> dict:
    """Alternating rounds on two live engines; two sessions of fresh workers, started in
    opposite orders, so that neither variant always gets the first (or second) process."""
    ctx = mp.get_context("spawn")
    prompts = [[(7 * i + j) % 500 + 3 for j in range(32)] for i in range(n_prompts)]
    variants = {"base": {}, "roma": {"deltas": deltas}}
    runs: dict[str, list[dict]] = {"base": [], "roma": []}
    sessions = [("base", "roma"), ("roma", "base")]
    for s_idx, start_order in enumerate(sessions):
        workers = {}
        try:
            for name in start_order:  # one at a time: start-ups would compete for CPU
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_throughput_worker,
                    args=(child, model, variants[name], prompts, max_tokens),
                )
                proc.start()
                workers[name] = (proc, parent)
                assert parent.recv() == "ready"
            for r in range(s_idx * rounds // 2, (s_idx + 1) * rounds // 2):
                for name in ["base", "roma"] if r % 2 == 0 else ["roma", "base"]:
                    workers[name][1].send("run")
                    runs[name].append(workers[name][1].recv())
                    x = runs[name][-1]
                    print(f"  throughput round {r + 1}/{rounds} {name}: "
                          f"{x['tokens'] / x['seconds']:.1f} tok/s, "
                          f"{x['tokens'] / x['cpu_seconds']:.1f} tok/CPU-s", flush=True)  # fmt: skip
        finally:
            for proc, conn in workers.values():
                with contextlib.suppress(OSError):
                    conn.send("stop")
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.kill()
    out: dict[str, Any] = {
        "batch": {"prompts": n_prompts, "prompt_tokens": 32, "max_tokens": max_tokens},
        "rounds": len(runs["base"]),
        "routing_changed": runs["base"][0]["first_tokens"] != runs["roma"][0]["first_tokens"],
    }
    for unit, key in (("tokens_per_s", "seconds"), ("tokens_per_cpu_s", "cpu_seconds")):
        rates = {n: [x["tokens"] / x[key] for x in runs[n]] for n in runs}
        out[unit] = compare(rates["base"], rates["roma"], higher_is_better=True)
    return out


# -- load time (one process, engines started and stopped in turn) ------------------------


def _load_time_worker(conn: Any, model: str, deltas: str, pairs: int) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import gc

    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    keys = ("engine_start_s", "engine_start_cpu_s", "model_load_s", "model_load_cpu_s")
    results: dict[str, dict[str, list[float]]] = {
        n: {k: [] for k in keys} for n in ("base", "roma")
    }
    variants = {"base": {}, "roma": {"deltas": deltas}}
    with vllm_load_timers() as timers:
        for i in range(pairs + 1):  # the first pair warms caches (page cache, imports): dropped
            for name in ["base", "roma"] if i % 2 == 0 else ["roma", "base"]:
                # vLLM's loader calls gc.collect(), whose cost grows with everything earlier
                # engines left on the heap: freeze it, so each start sees a fresh process's heap
                gc.collect()
                gc.freeze()
                t0, c0 = time.perf_counter(), time.process_time()
                llm = LLM(model, **engine_kwargs(variants[name]))
                start, start_cpu = time.perf_counter() - t0, time.process_time() - c0
                del llm
                gc.collect()
                cleanup_dist_env_and_memory()
                sample = (start, start_cpu, *timers["get_model"][-1])
                if i > 0:
                    for key, value in zip(keys, sample, strict=True):
                        results[name][key].append(value)
                print(f"  load round {i}/{pairs} {name}: start {start:.2f} s ({start_cpu:.2f} "
                      f"CPU-s), model load {sample[2]:.2f} s ({sample[3]:.2f} CPU-s)",
                      flush=True)  # fmt: skip
    # the loader's own work per roma start, the warm-up pair's dropped
    conn.send({"samples": results, "loader_overhead_s": timers["loader_own"][1:]})


def bench_load_time(model: str, deltas: str, pairs: int) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_load_time_worker, args=(child, model, deltas, pairs))
    proc.start()
    received = parent.recv()
    proc.join(timeout=60)
    results, overheads = received["samples"], received["loader_overhead_s"]
    out: dict[str, Any] = {"pairs": pairs}
    for key in results["base"]:
        out[key] = compare(results["base"][key], results["roma"][key], higher_is_better=False)
    own = statistics.median(overheads)
    out["loader_own_work"] = {
        "seconds": [round(x, 4) for x in overheads],
        "median_s": round(own, 4),
        # the plugin's whole extra work, against the base model's load: the robust figure
        "fraction_of_base_model_load": round(own / out["model_load_s"]["median"]["base"], 4),
    }
    return out


# -- load test (vllm serve + openai client) -------------------------------------------------


async def _load_round(base_url: str, n: int, concurrency: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    gate = asyncio.Semaphore(concurrency)
    completed = failed = tokens = 0
    errors: list[str] = []

    async def one(i: int) -> None:
        nonlocal completed, failed, tokens
        async with gate:
            try:
                r = await client.completions.create(
                    model=model, prompt=f"question {i}: the cat and the dog are",
                    max_tokens=max_tokens, temperature=0.0, extra_body={"ignore_eos": True},
                )  # fmt: skip
                completed += 1
                tokens += r.usage.completion_tokens
            except Exception as e:  # counted and reported, not raised: that is the measurement
                failed += 1
                errors.append(f"{type(e).__name__}: {e}"[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    seconds = time.perf_counter() - t0
    await client.close()
    return {
        "completed": completed,
        "failed": failed,
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "output_tokens_per_s": round(tokens / seconds, 2),
        "requests_per_s": round(completed / seconds, 3),
        "errors": errors[:5],
    }


def bench_load_test(
    model: str, deltas: str, rounds: int, n: int, concurrency: int, max_tokens: int, logs: Path
) -> dict:
    from roma_vllm.testing.helpers import VllmServer

    common = ["--dtype", DTYPE, "--enforce-eager", "--max-model-len", "512", "--seed", "0"]
    roma = ["--load-format", "roma",
            "--model-loader-extra-config", json.dumps({"roma_deltas": deltas})]  # fmt: skip
    servers = {
        "base": VllmServer(model, common, log_path=logs / "serve-base.log"),
        "roma": VllmServer(model, common + roma, log_path=logs / "serve-roma.log"),
    }
    runs: dict[str, list[dict]] = {"base": [], "roma": []}
    try:
        for server in servers.values():  # both start at once: half the waiting
            server.launch()
        for server in servers.values():
            server.wait_ready()
        for r in range(rounds):
            for name in ["base", "roma"] if r % 2 == 0 else ["roma", "base"]:
                c0 = servers[name].cpu_seconds()
                res = asyncio.run(_load_round(servers[name].base_url, n, concurrency, max_tokens))
                res["cpu_seconds"] = round(servers[name].cpu_seconds() - c0, 2)
                res["output_tokens_per_cpu_s"] = round(res["tokens"] / res["cpu_seconds"], 2)
                runs[name].append(res)
                print(f"  load test round {r + 1}/{rounds} {name}: {res['completed']} ok, "
                      f"{res['failed']} failed, {res['output_tokens_per_s']} tok/s, "
                      f"{res['output_tokens_per_cpu_s']} tok/CPU-s", flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    assert "roma-vllm: merged router deltas" in servers["roma"].log()
    out: dict[str, Any] = {
        "requests_per_round": n,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "startup_s": {k: round(s.startup_seconds, 1) for k, s in servers.items()},
    }
    for name, rs in runs.items():
        out[name] = {
            "completed": sum(x["completed"] for x in rs),
            "failed": sum(x["failed"] for x in rs),
            "rounds": rs,
        }
    for key in ("output_tokens_per_s", "output_tokens_per_cpu_s"):
        out[key] = compare(
            [x[key] for x in runs["base"]], [x[key] for x in runs["roma"]], higher_is_better=True
        )
    return out
