"""``python -m bench.realsize.profile_step``: one training step against one no-grad forward,
op by op, on a reduced OLMoE-7B layout in bf16 (the realsize benchmark's path, in minutes).

Prints, for both, torch.profiler's top CPU ops (self time) grouped into matmuls, attention,
the expert loop's indexing, elementwise work and the rest, and the time share of each
group; with ``--onednn`` the oneDNN kernels that ran (``ONEDNN_VERBOSE``: which ISA each
primitive used, e.g. ``avx512_core_bf16`` or ``avx512_core_amx``) are counted too. The
point is the split between work that AMX accelerates (bf16 matmuls through oneDNN) and work
it does not (elementwise, indexing, float32 ops): on an AMX CPU the first shrinks and the
ratio epoch / forward grows by the second's share of the training step.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from bench.common import BENCH

# reduced layout: the 7B's experts (64, top-8) and head size, fewer and narrower layers
REDUCED: dict[str, Any] = dict(
    num_hidden_layers=6,
    hidden_size=1024,
    intermediate_size=512,
    num_attention_heads=8,
    num_key_value_heads=8,
)
GROUPS = [  # first match wins; names as torch.profiler reports them
    ("matmul", r"addmm|^aten::mm$|bmm|matmul|linear|mkldnn|onednn"),
    ("attention", r"attention|sdpa|flash"),
    ("indexing (expert loop)", r"index|gather|scatter|where|nonzero|one_hot|masked|select|cat"),
    ("float32 casts", r"^aten::to$|_to_copy|copy_"),
    ("elementwise", r"mul|add|silu|sigmoid|pow|rsqrt|mean|sum|softmax|neg|exp|div|sub|fill"),
]


def group_of(op: str) -> str:
    """The group an operator name belongs to (see ``GROUPS``); ``other`` when none."""
    for name, pattern in GROUPS:
        if re.search(pattern, op):
            return name
    return "other"


def cpu_seconds(fn: Any) -> float:
    """CPU seconds of the process while ``fn`` runs (steadier than wall time on a shared
    machine: other work delays a run but does not add to its CPU time)."""
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def op_times(fn: Any, runs: int = 3) -> dict[str, float]:
    """Self time per operator (seconds, the profiler's wall clock on the calling thread),
    the smallest of ``runs`` profiled calls of ``fn``: other work on a shared machine only
    ever adds to an operator's time."""
    import torch

    best: dict[str, float] = {}
    for _ in range(runs):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        for ev in prof.key_averages():
            t = ev.self_cpu_time_total / 1e6
            best[ev.key] = min(best.get(ev.key, t), t)
    return best


def grouped(ops: dict[str, float]) -> dict[str, float]:
    """``op_times`` summed per group of ``GROUPS``."""
    out: Counter[str] = Counter()
    for op, t in ops.items():
        out[group_of(op)] += t
    return dict(out)


def projected_ratio(fwd: dict[str, float], step: dict[str, float], speedup: float) -> float:
    """step / forward if the matmuls ran ``speedup`` times faster and nothing else did."""

    def total(g: dict[str, float]) -> float:
        return g.get("matmul", 0.0) / speedup + sum(t for k, t in g.items() if k != "matmul")

    return total(step) / total(fwd)


def onednn_isas(log: str) -> Counter[str]:
    """``ONEDNN_VERBOSE`` execution lines by (primitive, implementation), e.g.
    ``('matmul', 'brg_matmul:avx512_core_amx')``."""
    out: Counter[str] = Counter()
    for line in log.splitlines():
        parts = line.split(",")
        if len(parts) > 6 and parts[0].startswith("onednn_verbose") and "exec" in parts:
            i = parts.index("exec")
            out[f"{parts[i + 2]} {parts[i + 3]}"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.realsize.profile_step")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of each")
    ap.add_argument("--batch", type=int, default=8, help="samples per step (the bench's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    ap.add_argument("--onednn", action="store_true", help="count oneDNN kernels (verbose log)")
    args = ap.parse_args(argv)
    if args.onednn:
        # oneDNN reads the variable once, when it loads: run again with it set, and count
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--onednn"]
        proc = subprocess.run(
            [sys.executable, "-m", "bench.realsize.profile_step", *rest],
            env={**os.environ, "ONEDNN_VERBOSE": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        print("".join(x + "\n" for x in proc.stdout.splitlines() if "onednn_verbose" not in x))
        print("oneDNN primitives executed (kind, implementation: count):")
        for kernel, n in onednn_isas(proc.stdout).most_common():
            print(f"  {kernel}: {n}")
        return 0
    import torch

    from bench.realsize.build import ensure_checkpoint, write_prompts
    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples
    from tuner.model.forward import collate, forward
    from tuner.model.load import load_model
    from tuner.model.routing import RoutingCapture
    from tuner.train.loop import train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = ensure_checkpoint(BENCH / ".cache" / "olmoe-profile", REDUCED)
    tm = load_model(str(model), layers="last5", dtype="bfloat16", device="cpu")
    data = write_prompts(BENCH / ".cache" / "olmoe-profile-prompts.jsonl")
    enc = encode(load_examples(str(data)).examples, tm.tokenizer, "letter")
    batch = collate(enc, list(range(args.batch)), tm.tokenizer.pad_token_id)
    width = len(tm.layers) * tm.num_experts
    targets = torch.full((args.batch, 3, width), 1.0 / tm.num_experts)
    weights = torch.full((args.batch, 3), 1.0 / 3)
    with RoutingCapture(tm) as capture:

        def step() -> None:
            for p in tm.parameters():
                p.grad = None
            train_step(tm, batch, targets, weights, 0.3, capture)

        def no_grad() -> None:
            with torch.no_grad():
                forward(tm, batch, capture)

        no_grad(), step()  # warm-up: oneDNN builds its kernels on first use
        fwds, trns = [], []
        for _ in range(args.repeats):  # interleaved: both see the same load
            fwds.append(cpu_seconds(no_grad))
            trns.append(cpu_seconds(step))
        fwd_ops, trn_ops = op_times(no_grad, args.repeats), op_times(step, args.repeats)
    fwd, trn = statistics.median(fwds), statistics.median(trns)
    fwd_groups, trn_groups = grouped(fwd_ops), grouped(trn_ops)
    print(
        f"reduced OLMoE ({REDUCED}), bf16, tuned layers {tm.layers}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, torch cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"no-grad forward {fwd * 1000:.0f} CPU-ms, training step {trn * 1000:.0f} CPU-ms "
        f"(medians of {args.repeats}): {trn / fwd:.2f}x"
    )
    print(f"{'group':<24}{'forward ms':>12}{'step ms':>10}{'step share':>12}")
    total = sum(trn_groups.values())
    for g in sorted(set(fwd_groups) | set(trn_groups), key=lambda g: -trn_groups.get(g, 0)):
        f, t = fwd_groups.get(g, 0.0), trn_groups.get(g, 0.0)
        print(f"{g:<24}{f * 1000:>12.0f}{t * 1000:>10.0f}{t / total:>12.1%}")
    print("training step, top operators by self CPU time (ms; forward beside):")
    for op, t in sorted(trn_ops.items(), key=lambda x: -x[1])[:12]:
        print(f"  {op:<40}{t * 1000:>8.0f}{fwd_ops.get(op, 0.0) * 1000:>8.0f}")
    projected = ", ".join(
        f"{s:g}x: {projected_ratio(fwd_groups, trn_groups, s):.2f}x" for s in (1, 2, 4)
    )
    print(f"step / forward if only the matmuls ran faster (speed-up: ratio): {projected}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
