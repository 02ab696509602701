"""Measurement: one variant per fresh process (epoch times, peak memory), and the driver that
runs every (repetition, variant) in turn."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.tuner_speed.naive import check_objective, naive_loss, naive_train
from bench.tuner_speed.setup import (
    VARIANTS,
    Setup,
    build,
    load,
    load_targets,
    make_targets,
    tune_config,
)


def prepare(s: Setup, work: Path) -> dict[str, Any]:
    """Build the model and data in ``work``, save the shared targets, and check on one batch
    that the naive loop and ours compute the same objective; returns the data description."""
    import torch

    build(work, s)
    tm, encoded = load(s, work)
    snap, nb, info = make_targets(s, work, tm, encoded)
    info["objective_check"] = check_objective(tm, encoded, snap, nb, s)
    del tm
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return info


def warm_up(tm: Any, encoded: list[Any], s: Setup, snap: Any, nb: Any, variant: str,
            prefix: Any = None) -> None:  # fmt: skip
    """One untimed forward and backward of the variant's step on the first batch (first-call
    costs: allocator growth, lazy initialisation); no optimiser step, so nothing changes."""
    from tuner.model.forward import collate
    from tuner.model.routing import RoutingCapture
    from tuner.train.loop import train_step

    idx = list(range(min(s.batch_size, len(encoded))))
    with RoutingCapture(tm) as capture:
        if variant == "naive":
            width = max(len(e.prompt_ids) for e in encoded)
            naive_loss(tm, encoded, idx, width, snap, nb, s.lam, capture).total.backward()
        else:
            batch = collate(encoded, idx, tm.tokenizer.pad_token_id)
            states = prefix.states(batch).to(tm.device) if prefix is not None else None
            targets, weights = nb.targets(snap.routing, idx)
            train_step(tm, batch.to(tm.device), targets.to(tm.device), weights.to(tm.device),
                       s.lam, capture, states)  # fmt: skip
    for p in tm.parameters():
        p.grad = None


def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(variant: str, work: Path, s: Setup) -> dict[str, Any]:
    """One variant in this (fresh) process: epoch times and peak memory."""
    import torch

    from tuner.model.frozen_cache import PrefixCache
    from tuner.train.loop import train

    torch.set_num_threads(s.threads)
    tm, encoded = load(s, work)
    snap, nb = load_targets(work)
    cuda = tm.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mib = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak()
        start_mib = _status_mib("VmRSS")
    build_s = None
    with tempfile.TemporaryDirectory() as tmp:
        prefix = None
        if variant == "ours_cached":
            t0 = time.perf_counter()
            path = Path(tmp) / "prefix.bin"
            prefix = PrefixCache.build(tm, encoded, s.batch_size, path, tm.tokenizer.pad_token_id)
            build_s = time.perf_counter() - t0
        warm_up(tm, encoded, s, snap, nb, variant, prefix)
        if variant == "naive":
            epochs = naive_train(tm, encoded, s, snap, nb)
        else:
            grad = "dense" if variant == "ours_dense" else "topk"
            cfg = tune_config(
                s, work / "model", work / "train.jsonl", variant == "ours_cached", grad
            )
            cpu_marks = [time.process_time()]
            result = train(tm, encoded, cfg, snap, lambda _: nb, lambda: snap, Path(tmp),
                           neighbours=nb, prefix=prefix,
                           on_epoch_end=lambda _: cpu_marks.append(time.process_time()))  # fmt: skip
            # the epoch's own wall time (train() times only the steps); CPU time between
            # epoch ends (that also counts the small per-epoch checkpoint)
            epochs = [
                {"wall_s": r.seconds, "cpu_s": cpu_marks[i + 1] - cpu_marks[i]}
                for i, r in enumerate(result.history)
            ]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mib("VmHWM")
    n = len(encoded)
    return {
        "variant": variant,
        "samples_per_s": [n / e["wall_s"] for e in epochs],
        "cpu_samples_per_s": [n / e["cpu_s"] for e in epochs],
        "epochs": epochs,
        "prefix_build_s": build_s,
        "peak_mib": round(peak, 1),
        "start_mib": round(start_mib, 1),
        "working_mib": round(peak - start_mib, 1),
        "memory": "cuda max_memory_allocated" if cuda else "VmHWM (peak RSS)",
        "device": str(tm.device),
        "dtype": tm.dtype,
        "threads": torch.get_num_threads(),
    }


def run_variants(s: Setup, work: Path, reps: int) -> list[dict[str, Any]] | None:
    """Every (repetition, variant) in a fresh ``--worker`` subprocess, the variants in a
    rotating order; None (the failing worker's stderr printed) if one fails."""
    runs = []
    setup_args = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(s).items()]
    for rep in range(reps):
        r = rep % len(VARIANTS)
        order = VARIANTS[r:] + VARIANTS[:r]  # rotate: A/B/C/D, B/C/D/A, ...
        for v in order:
            cmd = [sys.executable, "-m", "bench.tuner_speed", "--worker", v]
            cmd += ["--work", str(work), *setup_args]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return None
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["rep"] = rep
            runs.append(run)
            speeds = ", ".join(f"{x:.2f}" for x in run["samples_per_s"])
            print(
                f"rep {rep + 1}/{reps} {v:<12} samples/s per epoch [{speeds}]  "
                f"peak {run['peak_mib']:.0f} MiB  working {run['working_mib']:.0f} MiB",
                flush=True,
            )
    return runs
