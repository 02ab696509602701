"""Summaries and the "## Real size" section of bench/README.md."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_summary

SECTION = "## Real size: a 7B-shaped MoE in bf16"
GOALS = {
    "model_load_ratio_max": 1.02,
    # "the plugin adds no copy of any weight": roma's peak resident memory may exceed the
    # base's by at most 1 % of the checkpoint (a copy of one layer's experts is 5.8 %; the
    # delta file itself is 0.02 %)
    "vllm_extra_rss_fraction_max": 0.01,
    "tune_peak_rss_over_checkpoint_max": 1.2,
    "epoch_over_forward_max": 1.5,
    "cached_epoch_over_forward_max": 1.0,
}
GIB = 1024**3


def _paired(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per-pair roma / base ratios of ``key`` (and roma - base), with their medians."""
    pairs = sorted({r["pair"] for r in rounds})
    by = {(r["pair"], r["variant"]): r[key] for r in rounds}
    base = [by[p, "base"] for p in pairs]
    roma = [by[p, "roma"] for p in pairs]
    ratios = [r / b for b, r in zip(base, roma, strict=True)]
    diffs = [r - b for b, r in zip(base, roma, strict=True)]
    return {
        "base": base,
        "roma": roma,
        "median": {"base": statistics.median(base), "roma": statistics.median(roma)},
        "ratios": [round(x, 4) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "differences": diffs,
        "difference_median": statistics.median(diffs),
    }


def summarise_vllm(rounds: list[dict[str, Any]], checkpoint_bytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: _paired(rounds, key)
        for key in (
            "model_load_s",
            "model_load_cpu_s",
            "engine_start_s",
            "peak_rss_bytes",
            "peak_anon_bytes",
            "maxrss_bytes",
        )
    }
    own = [r["loader_own_s"] for r in rounds if r["variant"] == "roma"]
    out["loader_own_s"] = {"seconds": own, "median": statistics.median(own)}
    extra = out["maxrss_bytes"]["difference_median"]
    out["extra_rss_fraction_of_checkpoint"] = extra / checkpoint_bytes
    tokens = {r["variant"]: r["tokens"] for r in rounds}
    out["greedy_tokens"] = tokens
    out["routing_changed"] = tokens["base"] != tokens["roma"]
    out["merge_logged_every_roma_round"] = all(
        r["merge_logged"] for r in rounds if r["variant"] == "roma"
    )
    out["met"] = {
        "model_load": out["model_load_s"]["ratio_median"] <= GOALS["model_load_ratio_max"],
        "no_weight_copy": out["extra_rss_fraction_of_checkpoint"]
        <= GOALS["vllm_extra_rss_fraction_max"],
    }
    return out


def summarise_tune(plain: dict[str, Any], cached: dict[str, Any], ckpt: int) -> dict[str, Any]:
    """Peak memory against the checkpoint; the epoch's time against one no-grad forward over
    the same rows, from the same run's log.

    A plain run makes three full no-grad passes over the training rows: the routing snapshot
    before training, the train-accuracy pass after the epoch, and the pass with the routers
    at served precision; "one forward" is their median (wall and CPU time alike). With
    ``--cache-frozen-layers`` one full forward is split in two stages: the frozen layers
    (building the cache) and the tuned ones (the snapshot, from the cached states).
    """
    passes = ("snapshot", "after_epoch", "served")
    out: dict[str, Any] = {
        "peak_rss_over_checkpoint": {
            v: r["maxrss_bytes"] / ckpt for v, r in (("plain", plain), ("cached", cached))
        },
        "anon_at_peak_over_checkpoint": {
            v: r["anon_at_peak_rss_bytes"] / ckpt for v, r in (("plain", plain), ("cached", cached))
        },
        "samples_per_second": {
            v: r["samples_per_second"] for v, r in (("plain", plain), ("cached", cached))
        },
    }
    for unit, key in (("wall", "stage_seconds"), ("cpu", "stage_cpu_seconds")):
        p, c = plain[key], cached[key]
        forward = statistics.median(p[x] for x in passes)
        cached_forward = c["prefix"] + c["snapshot"]
        out[unit] = {
            "forward_passes": {x: p[x] for x in passes},
            "forward": forward,
            "epoch": p["epoch"] if unit == "cpu" else plain["epoch_seconds"],
            "epoch_over_forward": (p["epoch"] if unit == "cpu" else plain["epoch_seconds"])
            / forward,
            "cached_forward": cached_forward,
            "cached_epoch": c["epoch"] if unit == "cpu" else cached["epoch_seconds"],
        }
        out[unit]["cached_epoch_over_forward"] = out[unit]["cached_epoch"] / cached_forward
        out[unit]["cached_epoch_over_plain_forward"] = out[unit]["cached_epoch"] / forward
    worst = max(out["peak_rss_over_checkpoint"].values())
    out["met"] = {
        "peak_rss": worst <= GOALS["tune_peak_rss_over_checkpoint_max"],
        "epoch_over_forward": out["wall"]["epoch_over_forward"] <= GOALS["epoch_over_forward_max"],
        "cached_epoch_over_forward": out["wall"]["cached_epoch_over_forward"]
        <= GOALS["cached_epoch_over_forward_max"],
    }
    return out


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with its summaries ("vllm", "tune", "notes") computed from the raw rounds."""
    ckpt = res["checkpoint"]["bytes"]
    res = dict(res)
    res["vllm"] = summarise_vllm(res["vllm_rounds"], ckpt)
    res["tune"] = summarise_tune(res["runs"]["plain"], res["runs"]["cached"], ckpt)
    res["notes"] = notes(res)
    return res


def notes(res: dict[str, Any]) -> list[str]:
    """What the figures say beyond the table, where a goal is missed in particular."""
    v, t = res["vllm"], res["tune"]
    m = res["machine"]
    out = []
    load = max(m["load_average"][0], m["load_average_end"][0])
    if load > (m.get("cpus") or 1):
        out.append(
            f"* The machine was shared (load average up to {load:.1f} on {m['cpus']} cores at the "
            "start and end of the run): wall-clock times stretch with other work's load, CPU "
            "seconds much less, so both are given."
        )
    if not t["met"]["peak_rss"]:
        anon = max(t["anon_at_peak_over_checkpoint"].values())
        peak = max(t["peak_rss_over_checkpoint"].values())
        if anon <= GOALS["tune_peak_rss_over_checkpoint_max"]:
            why = (
                f"at that moment the process's anonymous memory (the loaded weights, "
                f"activations, the optimiser) was {anon:.2f}x the checkpoint; the rest were "
                "pages of the safetensors shards that transformers' loader had mapped while "
                "copying them into the model (file-backed: the kernel can drop them under "
                "pressure, but `ru_maxrss` counts them)"
            )
        else:
            why = f"the anonymous memory alone was {anon:.2f}x the checkpoint at that moment"
        out.append(f"* Tuner peak RSS misses the 1.2x goal ({peak:.2f}x): {why}.")
    if not t["met"]["epoch_over_forward"] or not t["met"]["cached_epoch_over_forward"]:
        out.append(
            f"* Epoch / forward in CPU seconds: {t['cpu']['epoch_over_forward']:.2f}x, with the "
            f"cache {t['cpu']['cached_epoch_over_forward']:.2f}x (goals 1.5x / 1.0x on wall "
            "time)."
        )
    if not v["met"]["model_load"]:
        ml, mlc = v["model_load_s"]["median"], v["model_load_cpu_s"]["median"]
        out.append(
            f"* vLLM's model load took {ml['base']:.0f} s wall for {mlc['base']:.0f} CPU-s "
            f"(base, medians): most of it is spent waiting for "
            f"{res['checkpoint']['bytes'] / 1e9:.1f} GB to come off the disk (the engine's own "
            "memory leaves little room to keep the checkpoint in the page cache), so the "
            f"ratio is the disk's noise; in CPU seconds it is "
            f"{v['model_load_cpu_s']['ratio_median']:.3f}, and the loader's own work is "
            f"{1000 * v['loader_own_s']['median']:.0f} ms per load."
        )
    return out


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def readme_section(res: dict[str, Any]) -> str:
    v, t, f32, ck = res["vllm"], res["tune"], res["float32"], res["checkpoint"]
    pairs = len(v["model_load_s"]["ratios"])
    ml, mlc, rss = v["model_load_s"], v["model_load_cpu_s"], v["maxrss_bytes"]
    plain = res["runs"]["plain"]
    w, c = t["wall"], t["cpu"]
    fp = w["forward_passes"]
    rows = [
        "| measure | figure | goal | met |",
        "|---|---|---|---|",
        f"| vLLM model load (`get_model`: build, read + merge, post-process), roma / base: "
        f"median of {pairs} paired ratios ({', '.join(f'{x:.3f}' for x in ml['ratios'])}) "
        f"| **{ml['ratio_median']:.3f}** ({ml['median']['base']:.0f} s / "
        f"{ml['median']['roma']:.0f} s) | <= 1.02 | {_yes(v['met']['model_load'])} |",
        f"| the same in CPU seconds | {mlc['ratio_median']:.3f} ({mlc['median']['base']:.0f} / "
        f"{mlc['median']['roma']:.0f} CPU-s) | | |",
        f"| the loader's own work (read + check the deltas, merge them), median | "
        f"{1000 * v['loader_own_s']['median']:.0f} ms | | |",
        f"| vLLM engine process peak RSS (`ru_maxrss`), base / roma, medians | "
        f"{_gib(rss['median']['base'])} / {_gib(rss['median']['roma'])} | | |",
        f"| vLLM peak RSS, roma - base, median of pairs | "
        f"{rss['difference_median'] / 2**20:+.0f} MiB = "
        f"{100 * v['extra_rss_fraction_of_checkpoint']:+.2f} % of the checkpoint | no copy of "
        f"any weight (< 1 %) | {_yes(v['met']['no_weight_copy'])} |",
        f"| `roma-tune run` peak RSS / checkpoint size | "
        f"**{t['peak_rss_over_checkpoint']['plain']:.2f}x** ({_gib(plain['maxrss_bytes'])}, "
        f"of which anonymous {t['anon_at_peak_over_checkpoint']['plain']:.2f}x); with "
        f"`--cache-frozen-layers` {t['peak_rss_over_checkpoint']['cached']:.2f}x | <= 1.2x "
        f"| {_yes(t['met']['peak_rss'])} |",
        f"| `roma-tune run` samples/s (the epoch) | {t['samples_per_second']['plain']:.3f}; "
        f"with the cache {t['samples_per_second']['cached']:.3f} | | |",
        f"| one epoch / one no-grad forward over the same rows (wall) | "
        f"**{w['epoch_over_forward']:.2f}x** ({w['epoch']:.0f} s / {w['forward']:.0f} s, the "
        f"median of the run's passes {fp['snapshot']:.0f} / {fp['after_epoch']:.0f} / "
        f"{fp['served']:.0f} s) | <= 1.5x | {_yes(t['met']['epoch_over_forward'])} |",
        f"| the same in CPU seconds | {c['epoch_over_forward']:.2f}x ({c['epoch']:.0f} / "
        f"{c['forward']:.0f} CPU-s) | | |",
        f"| with `--cache-frozen-layers`: epoch / forward (wall) | "
        f"**{w['cached_epoch_over_forward']:.2f}x** ({w['cached_epoch']:.0f} s / "
        f"{w['cached_forward']:.0f} s: the same run's cache build + snapshot; "
        f"{w['cached_epoch_over_plain_forward']:.2f}x against the plain run's forward) "
        f"| <= 1.0x | {_yes(t['met']['cached_epoch_over_forward'])} |",
        f"| the same in CPU seconds | {c['cached_epoch_over_forward']:.2f}x "
        f"({c['cached_epoch']:.0f} / {c['cached_forward']:.0f} CPU-s) | | |",
        f"| `roma-tune run --dtype float32` | exit {f32['returncode']} after "
        f"{f32['wall_s']:.0f} s, peak RSS {f32['maxrss_bytes'] / 2**20:.0f} MiB | refused with "
        f"one line | {_yes(f32['returncode'] == 1 and len(f32['error_lines']) == 1)} |",
    ]
    m, build = res["machine"], ck["build"]
    how = "reused" if build["reused"] else f"built in {build['build_seconds']:.0f} s"
    lines = [
        SECTION,
        "",
        f"`make bench-realsize` (`{res['command']}`), {res['date']}, "
        f"{res['seconds'] / 60:.0f} min wall time in all; "
        f"{machine_summary(m, ('torch', 'vllm'))}; load average "
        f"{m['load_average'][0]:.1f} at the start and {m['load_average_end'][0]:.1f} at the end "
        "(other work shares the machine).",
        "",
        f"Model: an OLMoE-1B-7B-shaped checkpoint with random weights (16 layers, hidden 2048, "
        f"64 experts top-8, vocabulary 50304, {ck['parameters'] / 1e9:.2f}B parameters), bf16, "
        f"{ck['shards']} safetensors shards, {ck['bytes'] / 1e9:.2f} GB, written tensor by "
        f"tensor by `roma_vllm.testing.olmoe_7b.write_random_checkpoint` into "
        f"`{Path(ck['path']).relative_to(ROOT)}/` ({how}). Deltas: each of the last 5 routers rolled "
        f"by one expert (`write_handmade_deltas`), float32, "
        f"{res['deltas']['bytes'] / 1e6:.1f} MB; greedy tokens with / without them differ: "
        f"{v['routing_changed']}. vLLM: `LLM(...)` in a fresh process per round "
        f"(`bench/realsize/engine.py`: bf16, eager, max_model_len 256, 1 GiB KV cache), base "
        f"and roma alternating in pairs (base, roma, roma, base, ...). `roma-tune run`: "
        f"{res['data']['rows']} four-choice prompts of {res['data']['prompt_tokens']} tokens, "
        f"`--layers last5 --dtype bfloat16 --epochs 1 --batch-size 8 --device cpu`, without and "
        f"with `--cache-frozen-layers`; stage and epoch times from the run's own "
        f"`train_log.jsonl`, CPU seconds from polling the process. Peak memory: the kernel's "
        f"`ru_maxrss` of the process (resident pages, mapped checkpoint pages included).",
        "",
        *rows,
        "",
        f"The float32 run's output: `{'` / `'.join(f32['lines'])}`",
        "",
        *res.get("notes", []),
        "",
        "Raw numbers, per round and per stage: `bench/results/realsize.json`.",
    ]
    return "\n".join(lines).rstrip() + "\n"
