"""Summaries and the "## Real size" section of bench/README.md."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_summary
from bench.realsize.cpu_classes import class_rows
from bench.realsize.history import history_lines

SECTION = "## Real size: a 7B-shaped MoE in bf16"
GOALS = {
    "model_load_ratio_max": 1.02,
    # "the plugin adds no copy of any weight": after loading, roma's anonymous memory in use
    # (after malloc_trim; mapped checkpoint pages excluded) exceeds the base's by no more
    # than the deltas themselves (2.6 MB); one expert matrix alone is 4.2 MB
    "vllm_extra_anon": "at most the delta file's size",
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
        "ratio_best": round(min(roma) / min(base), 4),
        "differences": diffs,
        "difference_median": statistics.median(diffs),
    }


def spread(xs: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes of ``xs`` (the quartiles of one value are itself)."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {"min": min(xs), "q1": q1, "median": statistics.median(xs), "q3": q3, "max": max(xs)}


def summarise_vllm(
    rounds: list[dict[str, Any]], checkpoint_bytes: int, deltas_bytes: int
) -> dict[str, Any]:
    for r in rounds:
        r["anon_after_load_bytes"] = r["memory_after_load"]["RssAnon"]
        r["anon_after_trim_bytes"] = r["memory_after_trim"]["RssAnon"]
    out: dict[str, Any] = {
        key: _paired(rounds, key)
        for key in (
            "model_load_s",
            "model_load_cpu_s",
            "engine_start_s",
            "peak_rss_bytes",
            "peak_anon_bytes",
            "anon_after_load_bytes",
            "anon_after_trim_bytes",
            "maxrss_bytes",
        )
    }
    ml = out["model_load_s"]
    ml["ratio_spread"] = spread(ml["ratios"])
    roma = [r for r in rounds if r["variant"] == "roma"]
    own = [r["loader_own_s"] for r in roma]
    out["loader_own_s"] = {
        "seconds": own,
        "median": statistics.median(own),
        # the loader's own work as a share of the load it is part of, per roma round
        "share_of_load": [r["loader_own_s"] / r["model_load_s"] for r in roma],
    }
    out["read_through_s"] = [r["read_through"]["seconds"] for r in rounds if "read_through" in r]
    out["own_fraction_of_base_load"] = (
        out["loader_own_s"]["median"] / out["model_load_s"]["median"]["base"]
    )
    out["extra_rss_fraction_of_checkpoint"] = (
        out["maxrss_bytes"]["difference_median"] / checkpoint_bytes
    )
    out["extra_anon_bytes"] = out["anon_after_trim_bytes"]["difference_median"]
    tokens = {r["variant"]: r["tokens"] for r in rounds}
    out["greedy_tokens"] = tokens
    out["routing_changed"] = tokens["base"] != tokens["roma"]
    out["merge_logged_every_roma_round"] = all(
        r["merge_logged"] for r in rounds if r["variant"] == "roma"
    )
    out["met"] = {
        "model_load": out["model_load_s"]["ratio_median"] <= GOALS["model_load_ratio_max"],
        "no_weight_copy": out["extra_anon_bytes"] <= deltas_bytes,
    }
    return out


def _passes(run: dict[str, Any], unit: str) -> list[float]:
    """A plain run's full no-grad passes over the training rows: the snapshot, the pass
    after each epoch, the pass at served precision."""
    return [
        run["stages"]["snapshot"][unit],
        *(x[unit] for x in run["passes_after_epoch"]),
        run["served_pass"][unit],
    ]


def summarise_tune(plain: dict[str, Any], cached: dict[str, Any], ckpt: int) -> dict[str, Any]:
    """Peak memory against the checkpoint; epoch time against one no-grad forward over the
    same rows, from the runs' own logs.

    Times: the fastest of each kind (other work on a shared machine only ever slows a run
    down, so the minimum is the figure least touched by it) and, beside it, the medians.
    "One forward" is a plain run's full pass; with ``--cache-frozen-layers`` the epochs are
    divided by the plain run's forward (the same rows, the same model), and also by the
    cached run's own first full pass (cache build + snapshot).
    """
    runs = {"plain": plain, "cached": cached}
    out: dict[str, Any] = {
        "peak_rss_over_checkpoint": {v: r["maxrss_bytes"] / ckpt for v, r in runs.items()},
        "peak_anon_over_checkpoint": {v: r["peak_anon_bytes"] / ckpt for v, r in runs.items()},
        "anon_at_peak_over_checkpoint": {
            v: r["anon_at_peak_rss_bytes"] / ckpt for v, r in runs.items()
        },
        "samples_per_second": {
            v: {
                "best": max(e["samples_per_second"] for e in r["epochs"]),
                "median": statistics.median(e["samples_per_second"] for e in r["epochs"]),
            }
            for v, r in runs.items()
        },
    }
    for unit, key in (("wall", "seconds"), ("cpu", "cpu")):
        passes = _passes(plain, key)
        epochs = [e[key] for e in plain["epochs"]]
        cached_epochs = [e[key] for e in cached["epochs"]]
        first = cached["stages"]["prefix"][key] + cached["stages"]["snapshot"][key]
        o = {
            "forward_passes": passes,
            "epochs": epochs,
            "cached_epochs": cached_epochs,
            "forward": {"best": min(passes), "median": statistics.median(passes)},
            "epoch": {"best": min(epochs), "median": statistics.median(epochs)},
            "cached_epoch": {
                "best": min(cached_epochs),
                "median": statistics.median(cached_epochs),
            },
            "cached_first_pass": first,
        }
        for stat in ("best", "median"):
            o[f"epoch_over_forward_{stat}"] = o["epoch"][stat] / o["forward"][stat]
            o[f"cached_epoch_over_forward_{stat}"] = o["cached_epoch"][stat] / o["forward"][stat]
        o["cached_epoch_over_own_first_pass"] = o["cached_epoch"]["best"] / first
        out[unit] = o
    w = out["wall"]
    out["met"] = {
        "peak_rss": max(out["peak_rss_over_checkpoint"].values())
        <= GOALS["tune_peak_rss_over_checkpoint_max"],
        "epoch_over_forward": w["epoch_over_forward_best"] <= GOALS["epoch_over_forward_max"],
        "cached_epoch_over_forward": w["cached_epoch_over_forward_best"]
        <= GOALS["cached_epoch_over_forward_max"],
    }
    return out


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with its summaries ("vllm", "tune", "notes") computed from the raw rounds."""
    ckpt = res["checkpoint"]["bytes"]
    res = dict(res)
    res["vllm"] = summarise_vllm(res["vllm_rounds"], ckpt, res["deltas"]["bytes"])
    res["tune"] = summarise_tune(res["runs"]["plain"], res["runs"]["cached"], ckpt)
    res["notes"] = notes(res)
    return res


def notes(res: dict[str, Any]) -> list[str]:
    """What the figures say beyond the table: the noise, and why a goal is missed."""
    v, t, m = res["vllm"], res["tune"], res["machine"]
    w = t["wall"]
    out = []
    steps = [("vLLM rounds", r) for r in res["vllm_rounds"]]
    steps += [(f"`roma-tune run` ({k})", r) for k, r in res["runs"].items()]
    loads = [x for _, r in steps for x in r.get("load_average", [])]
    if loads and max(loads) > (m.get("cpus") or 1):
        vl = [x for r in res["vllm_rounds"] for x in r.get("load_average", [])]
        each = ", ".join(
            f"{k} {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}"
            for k, r in res["runs"].items()
        )
        out.append(
            f"* Other work shared the {m['cpus']} cores: 1-minute load average "
            f"{min(vl):.1f}-{max(vl):.1f} over the vLLM rounds; at the start and end of "
            f"the tuner runs: {each}. Wall-clock times stretch with it, and so do CPU seconds "
            "(the virtual cores themselves are contended): the plain run's no-grad passes "
            f"took {min(w['forward_passes']):.0f}-{max(w['forward_passes']):.0f} s, its epochs "
            f"{min(w['epochs']):.0f}-{max(w['epochs']):.0f} s."
        )
    ml, mlc = v["model_load_s"], v["model_load_cpu_s"]
    sp = ml.get("ratio_spread") or spread(ml["ratios"])
    read = v.get("read_through_s")
    cache = (
        f"Before every round the checkpoint was read through once ({min(read):.0f}-"
        f"{max(read):.0f} s), so both sides of each pair start from the same page-cache "
        "state: as much of it cached as the free memory holds (the engine's own 15 GiB "
        "push the rest out while it loads)"
        if read
        else "The page cache was not controlled: each load read the checkpoint from the disk "
        "or from the page cache, whichever the kernel kept between rounds"
    )
    own = v["loader_own_s"]
    shares = own.get("share_of_load")
    out.append(
        f"* vLLM model load: {ml['median']['base']:.0f} s wall and "
        f"{mlc['median']['base']:.0f} CPU-s (base, medians) for "
        f"{res['checkpoint']['bytes'] / 1e9:.1f} GB. {cache}. Paired roma / base ratios: "
        f"median {sp['median']:.3f}, quartiles {sp['q1']:.3f}-{sp['q3']:.3f}, range "
        f"{sp['min']:.3f}-{sp['max']:.3f} over {len(ml['ratios'])} pairs; the quartiles are "
        "the ratio's uncertainty, other work on the machine moves single loads by more "
        "than the 2 % goal. The plugin's whole extra work is what the loader times itself "
        "(reading and checking the deltas, merging them; the plugin's INFO line "
        "`roma-vllm: merged router deltas ... (N ms)`): "
        + ", ".join(f"{1000 * x:.0f}" for x in own["seconds"])
        + " ms per load"
        + (f", {min(shares):.2%}-{max(shares):.2%} of each roma load" if shares else "")
        + f", {v['own_fraction_of_base_load']:.2%} of the base model's load (medians)."
    )
    rss, anon, trim = v["maxrss_bytes"], v["anon_after_load_bytes"], v["anon_after_trim_bytes"]

    def mb(xs: list[float]) -> str:
        return ", ".join(f"{d / 1e6:+.2f}" for d in xs) + " MB"

    out.append(
        "* vLLM memory, roma - base per pair: anonymous memory in use after loading (after "
        f"`malloc_trim`) {mb(trim['differences'])}; before the trim {mb(anon['differences'])} "
        "(memory glibc keeps after the loader's temporaries are freed); peak anonymous "
        f"memory {mb(v['peak_anon_bytes']['differences'])}, polled every 0.2 s. The delta "
        f"file is {res['deltas']['bytes'] / 1e6:.1f} MB, one expert matrix 4.2 MB, one layer's "
        "experts 805 MB. Peak RSS (`ru_maxrss`) differs by "
        + ", ".join(f"{d / 2**20:+.0f} MiB" for d in rss["differences"])
        + ": checkpoint pages mapped while the shards are read, which the kernel keeps or "
        "drops depending on the memory free at that moment, in both variants alike."
    )
    if not t["met"]["peak_rss"]:
        anon_t = max(t["anon_at_peak_over_checkpoint"].values())
        peak = max(t["peak_rss_over_checkpoint"].values())
        if anon_t <= GOALS["tune_peak_rss_over_checkpoint_max"]:
            why = (
                f"at that moment the process's anonymous memory (the loaded weights, "
                f"activations, the optimiser) was {anon_t:.2f}x the checkpoint, and the rest "
                "were pages of the safetensors shards. transformers' loader (5.x, "
                "`modeling_utils`) opens every shard with mmap and closes them only after the "
                "last tensor is copied into the model, so each page it read stays mapped, and "
                "counted in RSS, until the end of loading, as long as the kernel has memory to "
                "spare. Those pages are file-backed and dropped under pressure: a trial run of "
                "this benchmark on 2026-12-04 with 17 GiB available peaked at 1.23x, with "
                "anonymous memory 1.04x"
            )
        else:
            why = f"the anonymous memory alone was {anon_t:.2f}x the checkpoint at that moment"
        out.append(f"* Tuner peak RSS misses the 1.2x goal (up to {peak:.2f}x): {why}.")
    frozen = res["deltas"]["layers"][0] - 1
    stages = res["runs"]["cached"]["stages"]
    out.append(
        f"* `--cache-frozen-layers`: building the cache (layers 0-{frozen}, once per run) took "
        f"{stages['prefix']['seconds']:.0f} s and the snapshot from it "
        f"{stages['snapshot']['seconds']:.0f} s, against {w['forward']['best']:.0f} s for the "
        "plain run's fastest whole forward; counted against the cached run's own first pass "
        f"the fastest epoch is {w['cached_epoch_over_own_first_pass']:.2f}x. Every epoch "
        "reuses the cache."
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
    sp = ml.get("ratio_spread") or spread(ml["ratios"])
    tr = v["anon_after_trim_bytes"]
    plain = res["runs"]["plain"]
    w, c, sps = t["wall"], t["cpu"], t["samples_per_second"]
    rows = [
        "| measure | figure | goal | met |",
        "|---|---|---|---|",
        f"| vLLM model load (`get_model`: build, read + merge, post-process), roma / base: "
        f"median of {pairs} paired ratios"
        + (", each load after a read-through of the checkpoint" if v.get("read_through_s") else "")
        + f" ({', '.join(f'{x:.3f}' for x in ml['ratios'])}) "
        f"| **{ml['ratio_median']:.3f}** (quartiles {sp['q1']:.3f}-{sp['q3']:.3f}; "
        f"{ml['median']['base']:.0f} s / "
        f"{ml['median']['roma']:.0f} s; best of {pairs} each: {ml['ratio_best']:.3f}) "
        f"| <= 1.02 | {_yes(v['met']['model_load'])} |",
        f"| the same in CPU seconds | {mlc['ratio_median']:.3f} ({mlc['median']['base']:.0f} / "
        f"{mlc['median']['roma']:.0f} CPU-s) | | |",
        f"| the loader's own work (read + check the deltas, merge them), median; its share "
        f"of the base load | {1000 * v['loader_own_s']['median']:.0f} ms; "
        f"{v['own_fraction_of_base_load']:.2%} | | |",
        f"| vLLM engine process anonymous memory in use after loading, base / roma, "
        f"medians | {_gib(tr['median']['base'])} / {_gib(tr['median']['roma'])} | | |",
        f"| the same, roma - base, median of pairs | "
        f"**{v['extra_anon_bytes'] / 1e6:+.2f} MB** | no copy of any weight (at most the "
        f"{res['deltas']['bytes'] / 1e6:.1f} MB of deltas) | {_yes(v['met']['no_weight_copy'])} |",
        f"| vLLM peak RSS (`ru_maxrss`, mapped checkpoint pages included), base / roma, "
        f"medians | {_gib(rss['median']['base'])} / {_gib(rss['median']['roma'])} | | |",
        f"| `roma-tune run` peak RSS / checkpoint size | "
        f"**{t['peak_rss_over_checkpoint']['plain']:.2f}x** ({_gib(plain['maxrss_bytes'])}, "
        f"anonymous memory peaked at {t['peak_anon_over_checkpoint']['plain']:.2f}x); with "
        f"`--cache-frozen-layers` {t['peak_rss_over_checkpoint']['cached']:.2f}x "
        f"(anonymous {t['peak_anon_over_checkpoint']['cached']:.2f}x) | <= 1.2x "
        f"| {_yes(t['met']['peak_rss'])} |",
        f"| `roma-tune run` samples/s, best / median of {len(w['epochs'])} epochs | "
        f"{sps['plain']['best']:.2f} / {sps['plain']['median']:.2f}; with the cache "
        f"{sps['cached']['best']:.2f} / {sps['cached']['median']:.2f} | | |",
        f"| one epoch / one no-grad forward over the same rows (wall; fastest of each) | "
        f"**{w['epoch_over_forward_best']:.2f}x** ({w['epoch']['best']:.0f} s / "
        f"{w['forward']['best']:.0f} s; medians {w['epoch_over_forward_median']:.2f}x) "
        f"| <= 1.5x | {_yes(t['met']['epoch_over_forward'])} |",
        f"| the same in CPU seconds | {c['epoch_over_forward_best']:.2f}x "
        f"({c['epoch']['best']:.0f} / {c['forward']['best']:.0f} CPU-s; medians "
        f"{c['epoch_over_forward_median']:.2f}x) | | |",
        f"| with `--cache-frozen-layers`: epoch / one no-grad forward (wall; fastest of each) "
        f"| **{w['cached_epoch_over_forward_best']:.2f}x** ({w['cached_epoch']['best']:.0f} s / "
        f"{w['forward']['best']:.0f} s; medians {w['cached_epoch_over_forward_median']:.2f}x) "
        f"| <= 1.0x | {_yes(t['met']['cached_epoch_over_forward'])} |",
        f"| the same in CPU seconds | {c['cached_epoch_over_forward_best']:.2f}x "
        f"({c['cached_epoch']['best']:.0f} / {c['forward']['best']:.0f} CPU-s; medians "
        f"{c['cached_epoch_over_forward_median']:.2f}x) | | |",
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
        "The ratios depend on the CPU class: on an AMX CPU oneDNN runs the bf16 matmuls on AMX "
        "tiles, so the no-grad forward (nearly all matmul) is much faster, while the rest of a "
        "training step is not (see the profile below). One row per CPU class measured; the "
        "figures of this run follow in detail.",
        "",
        *class_rows(res, GOALS),
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
        f"`--layers last5 --dtype bfloat16 --epochs {len(w['epochs'])} --batch-size 8 --device "
        f"cpu`, without and with `--cache-frozen-layers`; epoch and stage times from the run's "
        f"own `train_log.jsonl`, CPU seconds from polling the process. A plain run makes "
        f"{len(w['forward_passes'])} full no-grad passes over the training rows (the routing "
        "snapshot, the train-accuracy pass after each epoch, the pass at served precision: "
        + " / ".join(f"{x:.0f}" for x in w["forward_passes"])
        + " s here) and its epochs took "
        + " / ".join(f"{x:.0f}" for x in w["epochs"])
        + " s (with the cache "
        + " / ".join(f"{x:.0f}" for x in w["cached_epochs"])
        + " s); the ratios take the fastest of each, the figure least touched by other work, "
        "with the medians beside them. Peak memory: the kernel's `ru_maxrss` of the process "
        "(resident pages, mapped checkpoint pages included).",
        "",
        *rows,
        "",
        f"The float32 run's output: `{'` / `'.join(f32['lines'])}`",
        "",
        *res.get("notes", []),
        "",
        *history_lines(res.get("history", [])),
        "Raw numbers, per round and per stage: `bench/results/realsize.json`.",
    ]
    return "\n".join(lines).rstrip() + "\n"
