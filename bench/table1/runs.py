"""Running one unit of the experiment through the product's commands, with a cache.

Per unit (:mod:`bench.table1.folds`), on its own data folder: the search on the validation
split (seed 0; the tuner's own per-epoch validation accuracy picks the epochs), then every
condition's final runs, one per seed, each scored once on the unit's test split by
``roma-tune eval --backend hf`` (the plugin's exact equal on these models: see
``tests/test_eval.py``); then C3PO (:mod:`bench.c3po`, its learning rate chosen on the
validation split). ``roma-tune run`` is the product command; router tuning is ``--lambda 0``,
the dense-gradient conditions add ``--router-grad dense``. A run whose deltas exist for the
same settings is read back instead of trained again, so a stopped experiment resumes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import TUNE, run_logged

# condition -> (router gradient, RoMA or router tuning)
CONDITIONS: dict[str, tuple[str, bool]] = {
    "router tuning": ("topk", False),
    "RoMA": ("topk", True),
    "router tuning, dense": ("dense", False),
    "RoMA, dense": ("dense", True),
}


def tune(
    model: str, data: Path, out: Path, seed: int, params: dict[str, Any], log: Path
) -> dict[str, Any]:
    """One ``roma-tune run``; returns the training record stored in its delta file."""
    from roma_vllm.deltas import read_deltas

    args = [TUNE, "run", "--model", model, "--data", str(data / "train.jsonl")]
    args += ["--val", str(data / "val.jsonl"), "--out", str(out), "--seed", str(seed)]
    args += ["--scoring", "loglik", "--dtype", "float32", "--no-progress"]
    if out.exists():
        args.append("--overwrite")  # a run stopped half-way: start it again
    for key, value in params.items():
        args += [f"--{key}", str(value)]
    run_logged(args, log)
    return read_deltas(out).training


def evaluate(
    model: str, test: Path, deltas: Path | None, out: Path, log: Path, backend: str = "hf"
) -> dict[str, Any]:
    """``roma-tune eval``; returns the JSON report."""
    args = [TUNE, "eval", "--model", model, "--data", str(test), "--scoring", "loglik"]
    args += ["--json", str(out), "--backend", backend]
    if backend == "vllm":
        args.append("--enforce-eager")  # CPU: compiling costs minutes per engine
    if deltas is not None:
        args += ["--deltas", str(deltas)]
    run_logged(args, log)
    return json.loads(out.read_text())


def best_epoch(training: dict[str, Any]) -> tuple[float, int]:
    """Highest validation accuracy over epochs, and the number of epochs (the earliest)
    reaching it. The training record numbers its epochs from 0."""
    vals = [
        (e["val_accuracy"], -(e["epoch"] + 1))
        for e in training["epochs"]
        if e.get("val_accuracy") is not None
    ]
    acc, neg_epochs = max(vals)
    return acc, -neg_epochs


def run_name(params: dict[str, Any], seed: int) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(params.items())) + f"-seed{seed}"


class UnitRunner:
    """The runs of one unit, in ``work``; every command's output goes to ``work/commands.log``."""

    def __init__(self, model: str, data: Path, work: Path) -> None:
        self.model, self.data, self.work = model, data, work
        self.log = work / "commands.log"

    def trained(self, params: dict[str, Any], seed: int) -> tuple[Path, dict[str, Any]]:
        from roma_vllm.deltas import read_deltas

        out = self.work / "runs" / run_name(params, seed)
        if (out / "roma_deltas.safetensors").exists():
            return out, read_deltas(out).training
        return out, tune(self.model, self.data, out, seed, params, self.log)

    def scored(self, deltas: Path | None, name: str) -> dict[str, Any]:
        out = self.work / "eval" / f"{name}.json"
        if out.exists() and (deltas is None or out.stat().st_mtime > deltas.stat().st_mtime):
            return json.loads(out.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        return evaluate(self.model, self.data / "test.jsonl", deltas, out, self.log)

    def search(self, grid: dict[str, list], shared: dict[str, Any], seed: int) -> dict[str, Any]:
        """Per condition, the settings with the best validation accuracy (router tuning's
        learning rate first; RoMA's lambda at that rate), and every search run."""
        chosen: dict[str, dict[str, Any]] = {}
        runs: list[dict[str, Any]] = []

        def best(cond: str, options: list[dict[str, Any]]) -> dict[str, Any]:
            """The option with the best validation accuracy (fewest epochs on ties), with
            its number of epochs; the earlier option on a full tie."""
            tried = []
            for option in options:
                params = {**shared, **option, "router-grad": CONDITIONS[cond][0]}
                acc, epochs = best_epoch(self.trained(params, seed)[1])
                tried.append((acc, -epochs, params))
                runs.append({"condition": cond, "params": params, "val_accuracy": acc,
                             "best_epoch": epochs})  # fmt: skip
            _, neg_epochs, params = max(tried, key=lambda t: (t[0], t[1]))
            return {**params, "epochs": -neg_epochs}

        for cond, (_, roma) in CONDITIONS.items():  # router tuning before RoMA, per gradient
            if not roma:
                chosen[cond] = best(cond, [{"lr": lr, "lambda": 0} for lr in grid["lr"]])
                lr = chosen[cond]["lr"]
            else:  # lambda searched at router tuning's best lr
                chosen[cond] = best(cond, [{"lr": lr, "lambda": lam} for lam in grid["lambda"]])
        return {"chosen": chosen, "runs": runs}

    def finals(self, chosen: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, list]:
        """Per condition and seed: the test accuracy, overall and per task."""
        results: dict[str, list] = {}
        for cond, params in chosen.items():
            for seed in seeds:
                out, _ = self.trained(params, seed)
                report = self.scored(out, out.name)
                results.setdefault(cond, []).append(
                    {
                        "seed": seed,
                        "accuracy": report["overall"]["tuned"]["accuracy"],
                        "per_task": {
                            t: v["tuned"]["accuracy"] for t, v in report["per_task"].items()
                        },  # fmt: skip
                        "correct": [int(bool(s["tuned"]["correct"])) for s in report["samples"]],
                    }
                )
        return results

    def c3po(self, lrs: list[float], val_limit: int, k: int, steps: int) -> dict[str, Any]:
        out = self.work / "c3po.json"
        if not out.exists():
            args = [sys.executable, "-m", "bench.c3po", "--model", self.model]
            args += ["--reference", str(self.data / "train.jsonl")]
            args += ["--data", str(self.data / "test.jsonl"), "--val", str(self.data / "val.jsonl")]
            args += ["--val-limit", str(val_limit), "--lrs", ",".join(map(str, lrs))]
            args += ["--k", str(k), "--steps", str(steps), "--json", str(out)]
            run_logged(args, self.log)
        return json.loads(out.read_text())


def oracle(model: str, test: Path, steps: int, out: Path, log: Path) -> dict[str, Any]:
    """``bench.oracle`` in its own process (cached in ``out``)."""
    if not out.exists():
        args = [sys.executable, "-m", "bench.oracle", "--model", model, "--data", str(test)]
        run_logged([*args, "--steps", str(steps), "--json", str(out)], log)
    return json.loads(out.read_text())
