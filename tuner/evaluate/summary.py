"""Accuracy summaries of an evaluation report, comparison of two reports, and their
presentation (rich table, one-line notes, JSON)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuner.config import ConfigError
from tuner.evaluate.options import VARIANTS
from tuner.evaluate.results import SampleScore


def accuracy(results: Sequence[SampleScore]) -> dict[str, Any]:
    correct = sum(r.correct for r in results)
    n = len(results)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n}


def summarise(
    tasks: Sequence[str], scores: dict[str, list[SampleScore]], tolerance: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(overall, per-task) accuracy of every variant."""
    overall: dict[str, Any] = {}
    per_task: dict[str, Any] = {t: {} for t in sorted(set(tasks))}
    for variant, results in scores.items():
        overall[variant] = accuracy(results) | {
            "near_ties": sum(r.margin < tolerance for r in results)
        }
        for t in per_task:
            per_task[t][variant] = accuracy(
                [r for r, tt in zip(results, tasks, strict=True) if tt == t]
            )
    if "base" in scores and "tuned" in scores:
        changed = sum(
            b.prediction != t.prediction or b.correct != t.correct
            for b, t in zip(scores["base"], scores["tuned"], strict=True)
        )
        overall["changed_predictions"] = changed
    return overall, per_task


def compare(report: dict[str, Any], other: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Per-variant agreement of two reports on the same data (e.g. vLLM vs transformers).

    A disagreement is a different prediction (multiple choice) or a different outcome
    (free-form); it is a near-tie when either run's margin is below ``tolerance``.
    """
    a_samples, b_samples = report["samples"], other["samples"]
    if len(a_samples) != len(b_samples) or report["data_fingerprint"] != other["data_fingerprint"]:
        raise ConfigError(
            f"--check-against: {other.get('data')!r} was evaluated on other data "
            f"({len(b_samples)} samples, fingerprint {other['data_fingerprint']}) than this run "
            f"({len(a_samples)}, {report['data_fingerprint']})"
        )
    out: dict[str, Any] = {"backends": [report["backend"], other["backend"]]}
    for variant in VARIANTS:
        if variant not in report["overall"] or variant not in other["overall"]:
            continue
        ties: list[int] = []
        real: list[int] = []
        for i, (a, b) in enumerate(zip(a_samples, b_samples, strict=True)):
            x, y = a[variant], b[variant]
            if x["prediction"] == y["prediction"] and x["correct"] == y["correct"]:
                continue
            margins = [m if m is not None else math.inf for m in (x.get("margin"), y.get("margin"))]
            (ties if min(margins) < tolerance else real).append(i)
        out[variant] = {
            "agree": len(a_samples) - len(ties) - len(real),
            "near_tie_disagreements": ties,
            "disagreements": real,
        }
    return out


# ------------------------------------------------------------------ presenting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(report: dict[str, Any]) -> Any:
    """A rich table: accuracy per task and overall, base and tuned side by side."""
    from rich.table import Table

    variants = [v for v in VARIANTS if v in report["overall"]]
    backend = {"vllm": "vLLM", "hf": "transformers"}[report["backend"]]
    n = report["overall"]["base"]["n"]
    t = Table(title=f"Accuracy % ({backend}, {report['scoring']} scoring, {n} samples)")
    t.add_column("task")
    t.add_column("n", justify="right")
    for v in variants:
        t.add_column(v, justify="right")
    if "tuned" in variants:
        t.add_column("Δ", justify="right")

    def cells(entry: dict[str, Any]) -> list[str]:
        out = [_pct(entry[v]["accuracy"]) for v in variants]
        if "tuned" in variants:
            out.append(f"{100 * (entry['tuned']['accuracy'] - entry['base']['accuracy']):+.1f}")
        return out

    if len(report["per_task"]) > 1:
        for task, entry in report["per_task"].items():
            t.add_row(task, str(entry["base"]["n"]), *cells(entry))
        t.add_section()
    t.add_row("[b]all[/b]", str(n), *cells(report["overall"]))
    return t


def notes(report: dict[str, Any]) -> list[str]:
    """One-line remarks under the table: skipped rows, near-ties, agreement."""
    out = []
    s = report["overall"]
    if report["skipped_rows"]:
        out.append(f"{report['skipped_rows']} bad rows skipped")
    ties = {v: s[v]["near_ties"] for v in VARIANTS if v in s and s[v]["near_ties"]}
    if ties:
        parts = ", ".join(f"{v} {c}" for v, c in ties.items())
        out.append(f"near-ties (margin < {report['tolerance']:g}): {parts}")
    if "changed_predictions" in s:
        out.append(f"predictions changed by the deltas: {s['changed_predictions']}")
    agreement = report.get("agreement")
    if agreement:
        a, b = agreement["backends"]
        for v in VARIANTS:
            if v in agreement:
                r = agreement[v]
                out.append(
                    f"{v}: {a} vs {b} agree on {r['agree']} samples; near-tie disagreements "
                    f"{len(r['near_tie_disagreements'])}; other disagreements {len(r['disagreements'])}"
                )
    return out


def write_json(path: str, report: dict[str, Any]) -> None:
    from roma_vllm.deltas import atomic_write

    text = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
