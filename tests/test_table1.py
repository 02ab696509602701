"""bench.table1: the folds hold every family out exactly once and leak none of it into
tuning, and the unseen table takes each family's score from the fold that held it out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.table1.folds import tasks_of, units, write_unit
from bench.table1.runs import CONDITIONS, best_epoch
from bench.table1.summary import C3PO_ROWS, table

TASKS = ["a", "b", "c", "d", "e", "f"]


def _data(root: Path) -> Path:
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        rows = [{"question": f"{t} {i}", "choices": ["x", "y"], "answer": 0, "task": t}
                for i in range(n) for t in TASKS]  # fmt: skip
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_every_family_is_held_out_once_and_never_tuned_on(tmp_path: Path) -> None:
    data = _data(tmp_path)
    plan = units(tasks_of(data), 3)
    assert plan[0].seen and plan[0].test_tasks == tuple(TASKS)
    held = [t for u in plan[1:] for t in u.test_tasks]
    assert sorted(held) == TASKS
    for u in plan[1:]:
        folder = write_unit(u, data, tmp_path / u.name, rows_per_task=2)
        rows = {s: [json.loads(x) for x in (folder / f"{s}.jsonl").read_text().splitlines()]
                for s in ("train", "val", "test")}  # fmt: skip
        assert {r["task"] for r in rows["train"] + rows["val"]} == set(TASKS) - set(u.test_tasks)
        assert {r["task"] for r in rows["test"]} == set(u.test_tasks)
        assert len(rows["train"]) == 2 * len(u.tune_tasks)  # rows_per_task of each family
    with pytest.raises(SystemExit, match="--folds 4"):
        units(TASKS, 4)


def test_best_epoch_counts_epochs_from_one() -> None:
    record = {"epochs": [{"epoch": 0, "val_accuracy": 0.5}, {"epoch": 1, "val_accuracy": 0.7},
                         {"epoch": 2, "val_accuracy": 0.7}]}  # fmt: skip
    assert best_epoch(record) == (0.7, 2)


def test_unseen_table_pools_each_family_from_its_fold() -> None:
    seeds = [0, 1, 2]

    def unit(test: list[str], offset: float) -> dict:
        def per_task(seed: int) -> dict[str, float]:
            return {t: offset + 0.01 * seed + 0.1 * TASKS.index(t) / 10 for t in test}

        return {
            "test_tasks": test,
            "finals": {c: [{"per_task": per_task(s)} for s in seeds] for c in CONDITIONS},
            "c3po": {
                "scopes": {sc: {"c3po": {"per_task": per_task(0)}} for sc in C3PO_ROWS.values()}
            },  # fmt: skip
            "fixed": {"base": {t: 0.25 for t in TASKS}, "oracle": {t: 0.9 for t in TASKS}},
        }

    folds = [unit(["a", "b"], 0.3), unit(["c", "d"], 0.4), unit(["e", "f"], 0.5)]
    t = table(folds, seeds)
    rt = t["rows"]["router tuning"]
    expected = {t: (0.3 if t in "ab" else 0.4 if t in "cd" else 0.5) + 0.01 * TASKS.index(t)
                for t in TASKS}  # fmt: skip
    for task, value in expected.items():
        assert rt["per_task"][task][0] == pytest.approx(value + 0.01)  # mean over seeds 0..2
    per_seed = [sum(expected.values()) / 6 + 0.01 * s for s in seeds]
    assert rt["per_seed"] == pytest.approx(per_seed)
    assert t["rows"]["base"]["average"][0] == pytest.approx(0.25)
    diff = next(d for d in t["differences"] if d["a"] == "router tuning" and d["b"] == "base")
    assert diff["per_seed"] == pytest.approx([x - 0.25 for x in per_seed])
