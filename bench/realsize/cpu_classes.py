"""One row per CPU class measured: this machine's run, and runs reported from other CPU
classes (quoted as reported, not re-measured here).

Which CPU runs the benchmark changes its ratios: on an AMX CPU (Sapphire Rapids and later)
oneDNN runs the bf16 matmuls on AMX tiles, so the no-grad forward, nearly all matmul, gets
much faster, while the parts of a training step that are not bf16 matmuls (elementwise and
indexing work, float32 router math) run at the same speed as elsewhere: the ratio epoch /
forward grows. ``bench/realsize/profile_step.py`` measures that split.
"""

from __future__ import annotations

from typing import Any

# issue 17: `make bench-realsize` on a fresh clone of 598a734, an AMX machine (Sapphire
# Rapids class: amx_bf16 amx_tile avx512_bf16), quiet, 8 min; before the load measurement
# read the checkpoint through (its first base load came from a warm page cache)
REPORTED: list[dict[str, Any]] = [
    {
        "cpu_class": "AMX",
        "machine": "Sapphire Rapids class (amx_bf16, amx_tile, avx512_bf16)",
        "source": "reported in issue 17 on a fresh clone of 598a734, not re-measured by us",
        "model_load_ratio": 1.133,
        "model_load_ratios": [1.68, 1.13, 0.94],
        "loader_own_share": None,
        "tune_peak_rss_over_checkpoint": 1.19,
        "epoch_over_forward": 1.73,
        "cached_epoch_over_forward": 1.16,
    }
]


def measured_row(res: dict[str, Any]) -> dict[str, Any]:
    """This run's row, from a summarised results file."""
    m, v, t = res["machine"], res["vllm"], res["tune"]
    flags = m.get("cpu_flags")
    if flags is None:  # results from before the flags were recorded
        desc = f"{m.get('cpu')} (CPU flags not recorded by that run)"
    else:
        have = ", ".join(f for f, on in flags.items() if on) or "none of " + ", ".join(flags)
        desc = f"{m.get('cpu')} ({have}; torch {m.get('torch_cpu_capability')})"
    return {
        "cpu_class": m.get("cpu_class", "not recorded"),
        "machine": desc,
        "source": f"this run, {res['date']}",
        "model_load_ratio": v["model_load_s"]["ratio_median"],
        "model_load_ratios": v["model_load_s"]["ratios"],
        "loader_own_share": v["own_fraction_of_base_load"],
        "tune_peak_rss_over_checkpoint": t["peak_rss_over_checkpoint"]["plain"],
        "epoch_over_forward": t["wall"]["epoch_over_forward_best"],
        "cached_epoch_over_forward": t["wall"]["cached_epoch_over_forward_best"],
    }


def missed(row: dict[str, Any], goals: dict[str, Any]) -> list[str]:
    """The goals a row misses, by name."""
    checks = [
        ("vLLM load", row["model_load_ratio"], goals["model_load_ratio_max"]),
        ("tuner peak RSS", row["tune_peak_rss_over_checkpoint"], goals["tune_peak_rss_over_checkpoint_max"]),
        ("epoch / forward", row["epoch_over_forward"], goals["epoch_over_forward_max"]),
        ("cached epoch / forward", row["cached_epoch_over_forward"], goals["cached_epoch_over_forward_max"]),
    ]  # fmt: skip
    return [name for name, value, limit in checks if value > limit]


def class_rows(res: dict[str, Any], goals: dict[str, Any]) -> list[str]:
    """The README table: this run first, then the reported rows of other CPU classes."""
    mine = measured_row(res)
    rows = [mine, *(r for r in REPORTED if r["cpu_class"] != mine["cpu_class"])]
    lines = [
        "| CPU class | machine | figures | vLLM load roma / base: median (pairs' range) "
        "| loader's own share of the load | tuner peak RSS / checkpoint | epoch / forward "
        "| cached epoch / forward | goals missed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = r["model_load_ratios"]
        share = "not reported" if r["loader_own_share"] is None else f"{r['loader_own_share']:.2%}"
        lines.append(
            f"| {r['cpu_class']} | {r['machine']} | {r['source']} | {r['model_load_ratio']:.3f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs) | {share} | "
            f"{r['tune_peak_rss_over_checkpoint']:.2f}x | {r['epoch_over_forward']:.2f}x | "
            f"{r['cached_epoch_over_forward']:.2f}x | {', '.join(missed(r, goals)) or 'none'} |"
        )
    return lines
