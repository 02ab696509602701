"""``make table1``: both tables (seen and unseen tasks) through the product's commands.

    python -m bench.table1                      # the shipped demo model and data
    python -m bench.table1 --model M --data DIR # DIR holds train/val/test.jsonl with a task field

Outputs in ``--out`` (default ``bench/results``): ``table1.md``, ``table1.json``,
``table1_accuracy.png`` and the routing report of the seen-task RoMA model
(``table1_report/``). Runs are kept in ``--work``; a stopped experiment resumes from them.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import typer

from bench.common import (
    DEMO_DATA,
    DEMO_MODEL,
    RESULTS,
    ROOT,
    TUNE,
    run_logged,
    write_json,
    write_text,
)
from bench.table1.folds import Unit, tasks_of, units, write_unit
from bench.table1.report import markdown, plot
from bench.table1.runs import UnitRunner, oracle, run_name
from bench.table1.summary import table

app = typer.Typer(add_completion=False)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


@app.command()
def main(
    model: str = typer.Option(str(DEMO_MODEL), help="Pretrained MoE checkpoint."),
    data: Path = typer.Option(DEMO_DATA, help="Folder with train/val/test.jsonl (task field)."),
    seeds: str = typer.Option("0,1,2", help="Tuning seeds (comma-separated), at least 3."),
    lrs: str = typer.Option("1e-3,3e-3", help="Learning rates searched for router tuning."),
    lambdas: str = typer.Option("0.3,1.0", help="RoMA lambdas searched at the chosen lr."),
    epochs: int = typer.Option(4, help="Epochs per search run; the best epoch on val is kept."),
    k: int = typer.Option(3, help="Neighbours (RoMA and C3PO)."),
    folds: int = typer.Option(4, help="Unseen-task folds (they must divide the families)."),
    rows_per_task: int = typer.Option(None, help="Tuning rows per family (default: all)."),
    c3po_lrs: str = typer.Option("0.03,0.3", help="C3PO learning rates searched on val."),
    c3po_val_rows: int = typer.Option(96, help="Validation rows C3PO's search uses."),
    c3po_steps: int = typer.Option(10, help="C3PO neighbourhood-gradient steps."),
    oracle_steps: int = typer.Option(10, help="Oracle: Adam steps per sample."),
    jobs: int = typer.Option(2, help="Runs at a time (one core each)."),
    out: Path = typer.Option(RESULTS, help="Where results go."),
    work: Path = typer.Option(ROOT / "runs/table1", help="Scratch folder for runs (kept)."),
) -> None:
    """Run the experiment and write table1.md / table1.json / the plot."""
    start = time.perf_counter()
    seed_list = [int(s) for s in seeds.split(",")]
    if len(seed_list) < 3:
        raise typer.BadParameter("at least 3 seeds", param_hint="--seeds")
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per run: far faster than two
    plan = units(tasks_of(data), folds)
    grid = {"lr": lrs.split(","), "lambda": lambdas.split(",")}

    def run_unit(unit: Unit) -> dict[str, Any]:
        folder = write_unit(unit, data, work / unit.name / "data", rows_per_task)
        runner = UnitRunner(model, folder, work / unit.name)
        search = runner.search(grid, {"epochs": epochs, "k": k}, seed_list[0])
        print(f"{unit.name}: chosen {search['chosen']}", flush=True)
        finals = runner.finals(search["chosen"], seed_list)
        c3po = runner.c3po(_floats(c3po_lrs), c3po_val_rows, k, c3po_steps)
        base = runner.scored(None, "base")
        print(f"{unit.name}: done", flush=True)
        return {
            "name": unit.name,
            "tune_tasks": list(unit.tune_tasks),
            "test_tasks": list(unit.test_tasks),
            "train_rows": sum(1 for _ in (folder / "train.jsonl").open()),
            "search": search,
            "finals": finals,
            "c3po": c3po,
            "base": {t: v["base"]["accuracy"] for t, v in base["per_task"].items()},
        }

    test = data / "test.jsonl"  # the seen unit's test rows: every family's
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        oracle_job = pool.submit(
            oracle, model, test, oracle_steps, work / "oracle.json", work / "oracle.log"
        )
        done = list(pool.map(run_unit, plan))
        orc = oracle_job.result()
    for u in done:
        u["fixed"] = {
            "base": u["base"],
            "oracle": {t: v["oracle"] for t, v in orc["per_task"].items()},
        }
    record = {
        "model": model,
        "data": str(data),
        "seeds": seed_list,
        "k": k,
        "c3po_steps": c3po_steps,
        "rows_per_task": rows_per_task,
        "units": done,
        "oracle": {key: orc[key] for key in ("steps", "lr", "oracle", "base", "n")},
        "tables": {
            "seen": table([u for u in done if u["name"] == "seen"], seed_list),
            "unseen": table([u for u in done if u["name"] != "seen"], seed_list),
        },
        "jobs": jobs,
        "minutes": (time.perf_counter() - start) / 60,
    }
    write_json(out / "table1.json", record)
    write_text(out / "table1.md", markdown(record))
    plot(record, out / "table1_accuracy.png")
    roma = work / "seen" / "runs"
    chosen = done[0]["search"]["chosen"]["RoMA"]
    run_logged(
        [
            TUNE,
            "report",
            "--model",
            model,
            "--deltas",
            str(roma / run_name(chosen, seed_list[0])),
            "--data",
            str(test),
            "--out",
            str(out / "table1_report"),
        ],  # fmt: skip
        work / "seen" / "commands.log",
    )
    print((out / "table1.md").read_text())
    print(f"took {record['minutes']:.1f} min")


if __name__ == "__main__":
    app()
