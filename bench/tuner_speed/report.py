"""Reporting: medians and ratios over the runs, and the "## Tuner speed" README section."""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import machine_summary
from bench.tuner_speed.setup import TARGETS, VARIANTS, Setup

SECTION = "## Tuner speed"


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def summarise(runs: list[dict[str, Any]], s: Setup) -> dict[str, Any]:
    """Medians per variant over every timed epoch of every repetition, and the ratios
    against the naive loop."""
    med: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        med[v] = {
            "samples_per_s": _median([x for r in rs for x in r["samples_per_s"]]),
            "cpu_samples_per_s": _median([x for r in rs for x in r["cpu_samples_per_s"]]),
            "peak_mib": _median([r["peak_mib"] for r in rs]),
            "working_mib": _median([r["working_mib"] for r in rs]),
        }
        if v == "ours_cached":
            build = _median([r["prefix_build_s"] for r in rs])
            med[v]["prefix_build_s"] = build
            # the one-time build spread over the default 3 epochs
            epoch_s = s.samples / med[v]["samples_per_s"]
            med[v]["samples_per_s_incl_build_3_epochs"] = 3 * s.samples / (3 * epoch_s + build)
    n, o, c, d = med["naive"], med["ours"], med["ours_cached"], med["ours_dense"]
    ratios = {
        "speed_ours_over_naive": o["samples_per_s"] / n["samples_per_s"],
        "speed_cached_over_naive": c["samples_per_s"] / n["samples_per_s"],
        "speed_cached_incl_build_over_naive": (
            c["samples_per_s_incl_build_3_epochs"] / n["samples_per_s"]
        ),
        "cpu_speed_ours_over_naive": o["cpu_samples_per_s"] / n["cpu_samples_per_s"],
        "cpu_speed_cached_over_naive": c["cpu_samples_per_s"] / n["cpu_samples_per_s"],
        "working_memory_ours_over_naive": o["working_mib"] / n["working_mib"],
        "working_memory_cached_over_naive": c["working_mib"] / n["working_mib"],
        "peak_rss_ours_over_naive": o["peak_mib"] / n["peak_mib"],
        "peak_rss_cached_over_naive": c["peak_mib"] / n["peak_mib"],
        # --router-grad dense against the default top-k gradient (issue 14's cost question)
        "speed_dense_over_ours": d["samples_per_s"] / o["samples_per_s"],
        "cpu_speed_dense_over_ours": d["cpu_samples_per_s"] / o["cpu_samples_per_s"],
        "working_memory_dense_over_ours": d["working_mib"] / o["working_mib"],
    }
    # the same ratios within each repetition (its three runs ran back to back)
    per_rep = []
    for rep in sorted({r["rep"] for r in runs}):
        by = {r["variant"]: _median(r["samples_per_s"]) for r in runs if r["rep"] == rep}
        per_rep.append(
            {
                "ours": by["ours"] / by["naive"],
                "ours_cached": by["ours_cached"] / by["naive"],
                "dense_over_ours": by["ours_dense"] / by["ours"],
            }
        )
    met = {
        "speed ours >= 2x": ratios["speed_ours_over_naive"] >= TARGETS["speed_ours"],
        "speed cached >= 3x": ratios["speed_cached_over_naive"] >= TARGETS["speed_cached"],
        "working memory <= 0.5x": ratios["working_memory_ours_over_naive"] <= TARGETS["memory"],
        "peak RSS <= 0.5x": ratios["peak_rss_ours_over_naive"] <= TARGETS["memory"],
    }
    return {
        "medians": med,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "speed_ratios_per_rep": [{k: round(v, 3) for k, v in r.items()} for r in per_rep],
        "targets_met": met,
    }


def readme_section(res: dict[str, Any]) -> str:
    """The "## Tuner speed" section of bench/README.md."""
    s, med, r = res["setup"], res["summary"]["medians"], res["summary"]["ratios"]
    pt, chk = res["data"]["prompt_tokens"], res["data"]["objective_check"]
    rows = "\n".join(
        f"| {v} | {med[v]['samples_per_s']:.2f} | {med[v]['cpu_samples_per_s']:.2f} "
        f"| {med[v]['peak_mib']:.0f} | {med[v]['working_mib']:.0f} |"
        for v in VARIANTS
    )
    reps = ", ".join(
        f"{x['ours']:.2f}x / {x['ours_cached']:.2f}x, {x['dense_over_ours']:.2f}x"
        for x in res["summary"]["speed_ratios_per_rep"]
    )
    base = med["ours"]["peak_mib"] - med["ours"]["working_mib"]
    waits = ", ".join(
        f"{v} {med[v]['cpu_samples_per_s'] / med[v]['samples_per_s']:.2f}" for v in VARIANTS
    )
    return f"""{SECTION}

`{res["command"]}` (or `make bench-tuner`), {res["date"]}, {res["seconds"]:.0f} s.

What is compared: the training step of `roma-tune run` (`tuner.train.loop.train`: length-bucketed
batches, autograd only above the lowest tuned router, head rows only at the scored
positions), the same with `--cache-frozen-layers`, and a naive implementation of the same RoMA
objective written in `bench/tuner_speed/naive.py` (input embeddings requiring grad so autograd
spans every layer, full `[batch, seq, vocab]` logits, random batches padded to the
dataset's longest prompt). Same model, data, neighbour targets, AdamW, warm-up, clipping and
batch size. Before timing, one batch is scored both ways: the losses differ by
{chk["loss_abs_diff"]:.1e} and the router gradients by {chk["grad_max_rel_diff"]:.1e}
(relative), so both loops optimise the same objective.

Set-up: random OLMoE built with `roma_vllm.testing.tiny`, {s["layers"]} layers, hidden {s["hidden"]},
{s["experts"]} experts (top-{s["top_k"]}, width {s["expert_width"]}), vocabulary {s["vocab"]},
the last {s["tuned"]} routers tuned (the default); {s["samples"]} four-choice letter-scored
prompts of {pt["min"]}-{pt["max"]} tokens (mean {pt["mean"]}); global batch {s["batch_size"]},
{s["epochs"]} epochs per run, {res["reps"]} repetitions; float32 (`--dtype auto` on CPU).
{_machine_line(res)}.

Method: each (variant, repetition) in a fresh subprocess, variants alternating in a rotating
order; one untimed warm-up step, then every epoch timed; medians over all timed epochs.
CPU-time speed (samples per CPU-second) is the steadier figure on a shared machine.
Memory: peak resident set size (`VmHWM`) of the variant's process, reset through
`/proc/self/clear_refs` just before training so model loading is not counted; working
memory is that peak minus the resident size when training started.

| variant | samples/s | samples/CPU-s | peak RSS (MiB) | working memory (MiB) |
|---|---|---|---|---|
{rows}

| ratio | wall clock | CPU time | target |
|---|---|---|---|
| ours / naive speed | **{r["speed_ours_over_naive"]:.2f}x** | {r["cpu_speed_ours_over_naive"]:.2f}x | >= 2x |
| ours `--cache-frozen-layers` / naive speed | **{r["speed_cached_over_naive"]:.2f}x** | {r["cpu_speed_cached_over_naive"]:.2f}x | >= 3x |
| ours / naive working memory | **{r["working_memory_ours_over_naive"]:.2f}x** | | <= 0.5x |
| ours `--cache-frozen-layers` / naive working memory | {r["working_memory_cached_over_naive"]:.2f}x | | <= 0.5x |
| ours / naive whole-process peak RSS | {r["peak_rss_ours_over_naive"]:.2f}x | | |
| `--router-grad dense` / top-k (ours) speed | **{r["speed_dense_over_ours"]:.2f}x** | {r["cpu_speed_dense_over_ours"]:.2f}x | (cost) |
| `--router-grad dense` / top-k (ours) working memory | {r["working_memory_dense_over_ours"]:.2f}x | | (cost) |

* Speed ratios per repetition (ours / cached over naive, dense over ours; wall clock): {reps}.
* `--router-grad dense` (`ours_dense`) runs every expert of the tuned layers on every token
  in the backward's dense mixture ({s["experts"]} experts here, top-{s["top_k"]} served), so
  it costs more per step than the default top-k gradient; the rows above measure how much.
* Wall-clock time per CPU-second: {waits}. Above 1 the process waited for a core
  while others' work ran; that inflates the wall-clock ratios, so the CPU-time ratios are
  the conservative figures.
* The prefix cache costs one pass over the frozen layers ({med["ours_cached"]["prefix_build_s"]:.1f} s
  here); counted in, spread over 3 epochs (the default), the cached speed-up is
  {r["speed_cached_incl_build_over_naive"]:.2f}x.
* The whole-process peak includes ~{base:.0f} MiB resident before training (Python, torch, the
  weights) that no training loop can save, so its ratio stays above 0.5x on a model this
  small; the working-memory ratio is the one the target is about.

Raw numbers, per run and per epoch: `bench/results/tuner_speed.json`.
"""


def _machine_line(res: dict[str, Any]) -> str:
    m = res["machine"]
    threads = res["runs"][0]["threads"] if res["runs"] else "?"
    return (
        f"Machine: {machine_summary(m)}, {threads} thread(s) per process, shared with "
        f"other work (load average {m['load_average'][0]:.1f} at the start, "
        f"{m['load_average_end'][0]:.1f} at the end)"
    )
