"""One vLLM engine start in this process: ``python -m bench.realsize.engine MODEL OUT [DELTAS]``.

Run as a fresh subprocess per round (the parent measures the process tree's memory). The
engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor), so this
one process holds every weight. Written to OUT (JSON): the engine start-up and the model
load (``get_model``: build, stream + merge, post-process) in wall and CPU seconds, the
loader's own work (roma only), the process's resident memory after loading (``VmRSS``,
``RssAnon``, and its peak ``VmHWM``), the same after ``malloc_trim`` (glibc hands the freed
memory it kept back to the kernel: what remains is memory in use), and the greedy tokens of
one short prompt.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ENGINE = dict(
    dtype="bfloat16",
    enforce_eager=True,
    max_model_len=256,
    seed=0,
    distributed_executor_backend="uni",
)
PROMPT = [[5, 40, 41, 42, 43, 44, 45, 46]]  # token ids below the tokenizer's 512


def proc_status() -> dict[str, int]:
    """``/proc/self/status`` memory lines in bytes: VmRSS, VmHWM, RssAnon, RssFile."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def main(model: str, out: str, deltas: str | None = None) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # a fixed 1 GiB KV cache, as `make` sets it; without it vLLM's CPU worker reserves 92 %
    # of the machine's memory and refuses to start while other work holds more than 8 %
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm.v1.worker.cpu_model_runner as runner
    from vllm import LLM, SamplingParams

    loads: list[tuple[float, float]] = []
    real_get_model = runner.get_model

    def timed_get_model(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return real_get_model(*args, **kwargs)
        finally:
            loads.append((time.perf_counter() - t0, time.process_time() - c0))

    runner.get_model = timed_get_model
    own: list[float] = []
    kwargs: dict[str, Any] = dict(ENGINE)
    if deltas:
        from roma_vllm.loader import RomaModelLoader

        real_load_model = RomaModelLoader.load_model

        def load_model(self: Any, *args: Any, **kw: Any) -> Any:
            model = real_load_model(self, *args, **kw)
            own.append(self.overhead_seconds)
            return model

        RomaModelLoader.load_model = load_model  # type: ignore[method-assign]
        kwargs.update(load_format="roma", model_loader_extra_config={"roma_deltas": deltas})
    t0, c0 = time.perf_counter(), time.process_time()
    llm = LLM(model, **kwargs)
    start, start_cpu = time.perf_counter() - t0, time.process_time() - c0
    memory = proc_status()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = proc_status()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPT], params, use_tqdm=False)
    result = {
        "engine_start_s": start,
        "engine_start_cpu_s": start_cpu,
        "model_load_s": loads[-1][0],
        "model_load_cpu_s": loads[-1][1],
        "loader_own_s": own[-1] if own else None,
        "memory_after_load": memory,
        "memory_after_trim": trimmed,
        "tokens": list(outs[0].outputs[0].token_ids),
    }
    Path(out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
