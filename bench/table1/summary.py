"""From the units' results to the two tables: per task and on average, with paired differences.

Seen table: the seen unit's test scores. Unseen table: every task family scored by the fold
that held it out (a different tuned model per fold), pooled over the folds; with 50 test rows
per family the average over families is the accuracy over all test rows. Base and oracle do
not depend on the tuning data (one value each); C3PO does (its reference set is the unit's
tuning rows) but not on the seed. Differences are paired by seed (95% t interval over the
seeds); a deterministic row is paired with every seed of the other.
"""

from __future__ import annotations

from typing import Any

from bench.common import mean_std, paired_interval
from bench.table1.runs import CONDITIONS

C3PO_ROWS = {"C3PO, last token": "last", "C3PO, all tokens": "all"}
ROWS = ["base", *CONDITIONS, *C3PO_ROWS, "oracle"]
COMPARISONS = [
    ("RoMA", "router tuning"),
    ("router tuning, dense", "router tuning"),
    ("RoMA, dense", "RoMA"),
    ("RoMA, dense", "router tuning"),
    ("C3PO, last token", "router tuning"),
    ("C3PO, all tokens", "router tuning"),
    ("router tuning", "base"),
]


def per_seed_tasks(
    units: list[dict[str, Any]], row: str, seeds: list[int]
) -> list[dict[str, float]]:
    """Per seed, each test family's accuracy under ``row``, from the units scoring it."""
    out = []
    for i, _ in enumerate(seeds):
        tasks: dict[str, float] = {}
        for u in units:
            if row in CONDITIONS:
                tasks.update(u["finals"][row][i]["per_task"])
            elif row in C3PO_ROWS:
                tasks.update(u["c3po"]["scopes"][C3PO_ROWS[row]]["c3po"]["per_task"])
            else:
                tasks.update({t: v for t, v in u["fixed"][row].items() if t in u["test_tasks"]})
        out.append(tasks)
    return out


def table(units: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Rows of one table: per task and average, mean and std over seeds; paired differences."""
    rows: dict[str, Any] = {}
    averages: dict[str, list[float]] = {}
    for row in ROWS:
        seeded = per_seed_tasks(units, row, seeds)
        tasks = sorted(seeded[0])
        avg = [sum(s[t] for t in tasks) / len(tasks) for s in seeded]
        averages[row] = avg
        rows[row] = {
            "per_task": {t: mean_std([s[t] for s in seeded]) for t in tasks},
            "average": mean_std(avg),
            "per_seed": avg,
        }
    diffs = []
    for a, b in COMPARISONS:
        d = [x - y for x, y in zip(averages[a], averages[b], strict=True)]
        m, lo, hi = paired_interval(d)
        diffs.append({"a": a, "b": b, "mean": m, "ci95": [lo, hi], "per_seed": d})
    return {"rows": rows, "differences": diffs, "tasks": sorted(rows["base"]["per_task"])}
