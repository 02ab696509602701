"""Earlier runs of the benchmark: each run's key figures (``headline``), kept in the next
run's results (``previous_runs``) and listed under the README table (``history_lines``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def previous_runs(out: Path, keep: int = 5) -> list[dict[str, Any]]:
    """The last ``keep`` runs' key figures: those the results file already lists, and its own."""
    try:
        prev = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    return [*prev.get("history", []), *([prev["headline"]] if "headline" in prev else [])][-keep:]


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """A summarised run's key figures, kept in the next run's ``history``."""
    v, t = res["vllm"], res["tune"]
    return {
        "date": res["date"],
        "minutes": round(res["seconds"] / 60),
        "load_average": [res["machine"]["load_average"][0], res["machine"]["load_average_end"][0]],
        "pairs": len(v["model_load_s"]["ratios"]),
        "model_load_ratio": v["model_load_s"]["ratio_median"],
        "extra_anon_mb": round(v["extra_anon_bytes"] / 1e6, 2),
        "tune_peak_rss_over_checkpoint": round(t["peak_rss_over_checkpoint"]["plain"], 2),
        "epoch_over_forward": round(t["wall"]["epoch_over_forward_best"], 2),
        "cached_epoch_over_forward": round(t["wall"]["cached_epoch_over_forward_best"], 2),
        "tuner_timing": f"{len(t['wall']['epochs'])} epochs, fastest epoch / fastest pass",
    }


def history_lines(history: list[dict[str, Any]]) -> list[str]:
    """Earlier runs' key figures: how much they move from run to run on this machine."""
    if not history:
        return []
    lines = [
        "Earlier runs of the same benchmark on this machine (newest last):",
        "",
        "| date | min | load avg start / end | vLLM load ratio | anon roma - base | tuner "
        "peak RSS | epoch / forward | cached epoch / forward | tuner timing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in history:
        anon = "not measured" if h.get("extra_anon_mb") is None else f"{h['extra_anon_mb']:+.2f} MB"
        lines.append(
            f"| {h['date']} | {h['minutes']} | {h['load_average'][0]:.1f} / "
            f"{h['load_average'][1]:.1f} | {h['model_load_ratio']:.3f} ({h['pairs']} pairs) | "
            f"{anon} | {h['tune_peak_rss_over_checkpoint']:.2f}x | "
            f"{h['epoch_over_forward']:.2f}x | {h['cached_epoch_over_forward']:.2f}x | "
            f"{h.get('tuner_timing', '')} |"
        )
    return [*lines, ""]
