"""The experiment's units: the seen-task table and the unseen-task folds, as data folders.

A unit tunes on the train and val rows of its *tuning* families and is scored on the test
rows of its *test* families. The seen table is one unit (tuning = test = every family);
the unseen table rotates held-out families over folds (``--folds 4``: the families, sorted,
in consecutive pairs), so that every family is unseen exactly once. Tuning rows are the first
``rows_per_task`` train rows of each tuning family in file order (all of them by default);
validation and test rows are all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Unit:
    name: str  # "seen" or "fold-N"
    tune_tasks: tuple[str, ...]
    test_tasks: tuple[str, ...]

    @property
    def seen(self) -> bool:
        return self.tune_tasks == self.test_tasks


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tasks_of(data: Path) -> list[str]:
    return sorted({r["task"] for r in _rows(data / "test.jsonl")})


def units(tasks: list[str], folds: int) -> list[Unit]:
    """The seen unit, then ``folds`` folds holding out consecutive groups of the sorted tasks."""
    if folds < 2 or len(tasks) % folds:
        raise SystemExit(f"--folds {folds}: must be >= 2 and divide the {len(tasks)} task families")
    size = len(tasks) // folds
    out = [Unit("seen", tuple(tasks), tuple(tasks))]
    for f in range(folds):
        held = tuple(tasks[f * size : (f + 1) * size])
        out.append(Unit(f"fold-{f}", tuple(t for t in tasks if t not in held), held))
    return out


def write_unit(unit: Unit, data: Path, out: Path, rows_per_task: int | None = None) -> Path:
    """``out/{train,val,test}.jsonl`` for ``unit`` (rewritten only when they change)."""
    out.mkdir(parents=True, exist_ok=True)
    train: list[dict] = []
    taken: dict[str, int] = {}
    for row in _rows(data / "train.jsonl"):
        t = row["task"]
        if t in unit.tune_tasks and (rows_per_task is None or taken.get(t, 0) < rows_per_task):
            train.append(row)
            taken[t] = taken.get(t, 0) + 1
    splits = {
        "train": train,
        "val": [r for r in _rows(data / "val.jsonl") if r["task"] in unit.tune_tasks],
        "test": [r for r in _rows(data / "test.jsonl") if r["task"] in unit.test_tasks],
    }
    for name, rows in splits.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path = out / f"{name}.jsonl"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return out
