"""The paper's Table 1 in miniature: base / router tuning / RoMA / oracle on held-out data.

Every condition goes through the product's own commands: ``roma-tune run`` trains (router
tuning is ``--lambda 0``), ``roma-tune eval`` scores the test split through vLLM with the
plugin. Hyper-parameters are chosen on the validation split only (seed 0, the tuner's own
per-epoch validation accuracy); the test split is scored once per final configuration and
seed. The oracle (per-sample routing optimised with the label) is :mod:`bench.oracle`.

    python -m bench.table1                      # the shipped demo model and data
    python -m bench.table1 --model M --data DIR # DIR holds train/val/test.jsonl (tuner schema)

Outputs in ``--out`` (default ``bench/results``): ``table1.md``, ``table1.json``,
``table1_accuracy.png`` and the routing report of the RoMA model (``table1_report/``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from bench.common import (
    DEMO_DATA,
    DEMO_MODEL,
    RESULTS,
    ROOT,
    TUNE,
    mean_std,
    paired_interval,
    run_logged,
    write_json,
    write_text,
)

CONDITIONS = ("base", "router tuning", "RoMA", "oracle")

app = typer.Typer(add_completion=False)


def tune(
    model: str, data: Path, out: Path, seed: int, params: dict[str, Any], log: Path
) -> dict[str, Any]:
    """One ``roma-tune run``; returns the training record stored in its delta file."""
    from roma_vllm.deltas import read_deltas

    args = [TUNE, "run", "--model", model, "--data", str(data / "train.jsonl")]
    args += ["--val", str(data / "val.jsonl"), "--out", str(out), "--seed", str(seed)]
    args += ["--scoring", "loglik", "--dtype", "float32", "--no-progress"]
    for key, value in params.items():
        args += [f"--{key}", str(value)]
    run_logged(args, log)
    return read_deltas(out).training


def evaluate(model: str, test: Path, deltas: Path | None, out: Path, log: Path) -> dict[str, Any]:
    """``roma-tune eval`` through vLLM; returns the JSON report."""
    args = [TUNE, "eval", "--model", model, "--data", str(test), "--scoring", "loglik"]
    args += ["--json", str(out), "--enforce-eager"]  # CPU: compiling costs minutes per engine
    if deltas is not None:
        args += ["--deltas", str(deltas)]
    run_logged(args, log)
    return json.loads(out.read_text())


def best_epoch(training: dict[str, Any]) -> tuple[float, int]:
    """Highest validation accuracy over epochs, and the (earliest) epoch reaching it."""
    vals = [
        (e["val_accuracy"], -e["epoch"])
        for e in training["epochs"]
        if e.get("val_accuracy") is not None
    ]
    acc, neg_epoch = max(vals)
    return acc, -neg_epoch


def tuned_accuracy(report: dict[str, Any]) -> tuple[float, dict[str, float]]:
    overall = report["overall"]["tuned"]["accuracy"]
    per_task = {t: v["tuned"]["accuracy"] for t, v in report["per_task"].items()}
    return overall, per_task


def base_accuracy(report: dict[str, Any]) -> tuple[float, dict[str, float]]:
    overall = report["overall"]["base"]["accuracy"]
    per_task = {t: v["base"]["accuracy"] for t, v in report["per_task"].items()}
    return overall, per_task


@app.command()
def main(
    model: str = typer.Option(str(DEMO_MODEL), help="Pretrained MoE checkpoint."),
    data: Path = typer.Option(DEMO_DATA, help="Folder with train/val/test.jsonl."),
    seeds: str = typer.Option("0,1,2", help="Tuning seeds (comma-separated), at least 3."),
    lrs: str = typer.Option("1e-3,3e-3,1e-2", help="Learning rates searched for router tuning."),
    lambdas: str = typer.Option("0.1,0.3,1.0", help="RoMA lambdas searched at the chosen lr."),
    epochs: int = typer.Option(4, help="Epochs per search run; the best epoch on val is kept."),
    k: int = typer.Option(3, help="RoMA neighbours."),
    oracle_steps: int = typer.Option(10, help="Oracle: Adam steps per sample."),
    out: Path = typer.Option(RESULTS, help="Where results go."),
    work: Path = typer.Option(ROOT / "runs/table1", help="Scratch folder for runs."),
) -> None:
    """Run the experiment and write table1.md / table1.json / plots."""
    start = time.perf_counter()
    seed_list = [int(s) for s in seeds.split(",")]
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    test = data / "test.jsonl"

    # 1. search on the validation split, seed 0
    search: list[dict[str, Any]] = []
    grids = {
        "router tuning": [{"lr": lr, "lambda": 0} for lr in lrs.split(",")],
    }
    chosen: dict[str, dict[str, Any]] = {}
    for cond in ("router tuning", "RoMA"):
        for i, params in enumerate(grids[cond]):
            params = {**params, "epochs": epochs}
            training = tune(
                model,
                data,
                work / f"search-{cond.replace(' ', '_')}-{i}",
                seed_list[0],
                params,
                log,
            )
            acc, ep = best_epoch(training)
            search.append(
                {
                    "condition": cond,
                    "params": params,
                    "val_accuracy": acc,
                    "best_epoch": ep,
                    "val_before": training["val_accuracy_before"],
                }
            )
            print(f"search {cond} {params}: val {acc:.4f} at epoch {ep}", flush=True)
        best = max(
            (s for s in search if s["condition"] == cond),
            key=lambda s: (s["val_accuracy"], -s["best_epoch"]),
        )
        chosen[cond] = {**best["params"], "epochs": best["best_epoch"]}
        if cond == "router tuning":  # RoMA: lambda searched at router tuning's best lr
            lr = best["params"]["lr"]
            grids["RoMA"] = [{"lr": lr, "lambda": lam, "k": k} for lam in lambdas.split(",")]

    # 2. final runs: every seed, test split scored once per configuration and seed
    base_report = evaluate(model, test, None, work / "eval-base.json", log)
    base_overall, base_tasks = base_accuracy(base_report)
    results: dict[str, list[dict[str, Any]]] = {"router tuning": [], "RoMA": []}
    for cond, params in chosen.items():
        for seed in seed_list:
            run_dir = work / f"final-{cond.replace(' ', '_')}-seed{seed}"
            tune(model, data, run_dir, seed, params, log)
            report = evaluate(model, test, run_dir, work / f"eval-{run_dir.name}.json", log)
            overall, per_task = tuned_accuracy(report)
            results[cond].append({"seed": seed, "accuracy": overall, "per_task": per_task})
            print(f"test {cond} seed {seed}: {overall:.4f}", flush=True)

    # 3. oracle (deterministic: one value)
    from bench.oracle import oracle_accuracy

    oracle = oracle_accuracy(model, str(test), "loglik", steps=oracle_steps, progress=False)

    # 4. report
    tasks = sorted(base_tasks)
    summary = summarise(base_overall, base_tasks, results, oracle, tasks)
    record = {
        "model": model,
        "data": str(data),
        "seeds": seed_list,
        "search": search,
        "chosen": chosen,
        "results": results,
        "base": {"accuracy": base_overall, "per_task": base_tasks},
        "oracle": oracle,
        "summary": summary,
        "minutes": (time.perf_counter() - start) / 60,
    }
    write_json(out / "table1.json", record)
    write_text(out / "table1.md", markdown(record, tasks))
    plot(record, tasks, out / "table1_accuracy.png")
    roma_dir = work / f"final-RoMA-seed{seed_list[0]}"
    run_logged(
        [
            TUNE,
            "report",
            "--model",
            model,
            "--deltas",
            str(roma_dir),
            "--data",
            str(test),
            "--out",
            str(out / "table1_report"),
        ],
        log,
    )
    print((out / "table1.md").read_text())
    print(f"took {record['minutes']:.1f} min")


def summarise(
    base: float,
    base_tasks: dict[str, float],
    results: dict[str, list[dict[str, Any]]],
    oracle: dict[str, Any],
    tasks: list[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "base": {"mean": base, "std": 0.0},
        "oracle": {"mean": oracle["oracle"], "std": 0.0},
    }
    for cond, runs in results.items():
        m, s = mean_std([r["accuracy"] for r in runs])
        out[cond] = {
            "mean": m,
            "std": s,
            "per_task": {t: mean_std([r["per_task"][t] for r in runs]) for t in tasks},
        }
    diffs = [
        a["accuracy"] - b["accuracy"]
        for a, b in zip(results["RoMA"], results["router tuning"], strict=True)
    ]
    m, lo, hi = paired_interval(diffs)
    out["roma_minus_router_tuning"] = {"mean": m, "ci95": [lo, hi], "per_seed": diffs}
    return out


def _shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_absolute() and p.is_relative_to(ROOT) else path


def _pm(m: float, s: float) -> str:
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def markdown(record: dict[str, Any], tasks: list[str]) -> str:
    s = record["summary"]
    base_tasks = record["base"]["per_task"]
    oracle_tasks = record["oracle"]["per_task"]
    head = (
        "| condition | "
        + " | ".join(tasks)
        + " | average |\n|---|"
        + "---|" * (len(tasks) + 1)
        + "\n"
    )
    rows = [
        "| base | "
        + " | ".join(f"{100 * base_tasks[t]:.1f}" for t in tasks)
        + f" | {100 * s['base']['mean']:.1f} |",
    ]
    for cond in ("router tuning", "RoMA"):
        rows.append(
            f"| {cond} | "
            + " | ".join(_pm(*s[cond]["per_task"][t]) for t in tasks)
            + f" | {_pm(s[cond]['mean'], s[cond]['std'])} |"
        )
    rows.append(
        "| oracle | "
        + " | ".join(f"{100 * oracle_tasks[t]['oracle']:.1f}" for t in tasks)
        + f" | {100 * s['oracle']['mean']:.1f} |"
    )
    d = s["roma_minus_router_tuning"]
    chosen = record["chosen"]
    return (
        "# Table 1 in miniature (test split, accuracy %)\n\n"
        f"Model `{_shown(record['model'])}`, data `{_shown(record['data'])}`; seeds {record['seeds']} "
        "(mean ± std over seeds; base and oracle are deterministic).\n\n"
        + head
        + "\n".join(rows)
        + "\n\n"
        f"RoMA − router tuning, paired by seed: {100 * d['mean']:+.1f} points, "
        f"95% CI [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] "
        f"(per seed: {', '.join(f'{100 * x:+.1f}' for x in d['per_seed'])}).\n\n"
        f"Chosen on the validation split (seed {record['seeds'][0]}): router tuning {chosen['router tuning']}; "
        f"RoMA {chosen['RoMA']}. Oracle: {record['oracle']['steps']} Adam steps per sample at lr "
        f"{record['oracle']['lr']} on the same routers. Search: see table1.json. "
        f"Took {record['minutes']:.0f} min.\n"
    )


def plot(record: dict[str, Any], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = record["summary"]
    labels = [*tasks, "average"]
    series = {
        "base": (
            [record["base"]["per_task"][t] for t in tasks] + [s["base"]["mean"]],
            [0.0] * len(labels),
        ),
        "router tuning": (
            [s["router tuning"]["per_task"][t][0] for t in tasks] + [s["router tuning"]["mean"]],
            [s["router tuning"]["per_task"][t][1] for t in tasks] + [s["router tuning"]["std"]],
        ),
        "RoMA": (
            [s["RoMA"]["per_task"][t][0] for t in tasks] + [s["RoMA"]["mean"]],
            [s["RoMA"]["per_task"][t][1] for t in tasks] + [s["RoMA"]["std"]],
        ),
        "oracle": (
            [record["oracle"]["per_task"][t]["oracle"] for t in tasks] + [s["oracle"]["mean"]],
            [0.0] * len(labels),
        ),
    }
    x = np.arange(len(labels))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 1.1), 4))
    for i, (name, (means, stds)) in enumerate(series.items()):
        ax.bar(
            x + (i - 1.5) * width,
            [100 * m for m in means],
            width,
            yerr=[100 * e for e in stds],
            capsize=2,
            label=name,
        )
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("base / router tuning / RoMA / oracle (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app()
