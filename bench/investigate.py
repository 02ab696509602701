"""Why does RoMA not beat plain router tuning here? Variants of the method, on validation only.

Every variant is a ``roma-tune run`` on the downstream train split, scored by the tuner's own
per-epoch validation accuracy (the test split is never read). Each RoMA variant is compared
with plain router tuning (``--lambda 0``) under the same model, data, layers and seed: the
paired difference, with a 95% t interval over seeds, is the number that answers "did this
variant help?". Each model also gets the *transplant* test (`roma-tune diagnose transplant`): how
many wrong training answers become right when the sample is routed exactly like its
successful embedding neighbours (RoMA's target), against random successful samples.

    python -m bench.investigate                     # every variant, seeds 0,1,2
    python -m bench.investigate --only lambda-1,k-10 --seeds 0

Outputs in ``--out`` (default ``bench/results``): ``investigation.md``, ``investigation.json``
and ``investigation.png``. Runs go to ``--work`` (default ``runs/investigate``); a run whose
delta file exists and was made from the current model is reused, so an interrupted
investigation continues where it stopped.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from bench.common import (
    DEMO_DATA,
    DEMO_MODEL,
    RESULTS,
    ROOT,
    mean_std,
    paired_interval,
    write_json,
    write_text,
)
from bench.table1 import tune
from roma_vllm.deltas import atomic_write

app = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class Variant:
    """One RoMA variant and the router-tuning baseline it is paired with."""

    name: str
    what: str  # the question it answers, in a few words
    flags: dict[str, Any]  # roma-tune run flags on top of the shared settings
    baseline: dict[str, Any] = field(default_factory=dict)  # shared by RoMA and its baseline
    model: str = "demo"  # "demo" (shipped) or a key of EXTRA_MODELS


def variants(lam: float) -> list[Variant]:
    """The variants, RoMA at ``lam`` unless the variant says otherwise."""
    roma = {"lambda": lam}
    return [
        Variant("roma", f"paper defaults (k 3, sigma 0.4, refresh each epoch), lambda {lam}", roma),
        *(Variant(f"lambda-{x:g}", "strength of the manifold term", {"lambda": x}) for x in (1, 3)),
        Variant("refresh-never", "targets fixed at the base routing", {**roma, "refresh": "never"}),
        Variant("k-1", "one neighbour", {**roma, "k": 1}),
        Variant("k-10", "ten neighbours", {**roma, "k": 10}),
        Variant("eps-0.8", "epsilon-ball (cos >= 0.8) instead of kNN", {**roma, "eps": 0.8}),
        Variant("warmup-0", "no warm-up of lambda (and lr)", {**roma, "warmup": 0}, {"warmup": 0}),
        Variant("log-probs-0.01", "routing vectors as log-probabilities", {"lambda": 0.01, "routing-vector": "log-probs"}),
        Variant("last2", "only the last 2 routers tuned", roma, {"layers": "last2"}),
        Variant("last1", "only the last router tuned", roma, {"layers": "last1"}),
        Variant("data-25pct", "a quarter of the training data", roma, {"limit": 730}),
        Variant("specialised", "model without the Q/A format marker (--route-coef 1 only)", roma, model="specialised"),
        Variant("organic", "model without marker or routing supervision (the previous demo)", roma, model="organic"),
    ]  # fmt: skip


# Models besides the shipped demo one, pretrained here when missing (~5 min each) with
# bench.synthetic.pretrain on the demo's pretraining data: what the demo model would be
# without its Q/A format marker ("specialised") and without task-routing supervision too
# ("organic", the previous demo model).
EXTRA_MODELS: dict[str, dict[str, Any]] = {
    "specialised": {"route_coef": 1.0},
    "organic": {},
}


def build_models(work: Path, data: Path, needed: set[str]) -> dict[str, str]:
    """Checkpoint folder of every model in ``needed`` (``demo`` is the shipped one)."""
    models = {"demo": str(DEMO_MODEL)}
    for name in sorted(needed - {"demo"}):
        path = work / "models" / name
        models[name] = str(path)
        if (path / "model.safetensors").exists():
            continue
        from bench.synthetic import tasks
        from bench.synthetic.pretrain import PretrainConfig, pretrain

        pre = work / "pretrain-data"
        if not (pre / "pretrain.jsonl").exists():
            tasks.generate(pre, seed=0)  # the shipped demo model's pretraining data
        for split in ("train", "val", "test"):  # vocabulary and metrics: the data used here
            (pre / f"{split}.jsonl").write_text((data / f"{split}.jsonl").read_text())
        print(f"pretraining {name} ({EXTRA_MODELS[name]}) into {path} (~5 min)", flush=True)
        pretrain(pre, path, PretrainConfig(**EXTRA_MODELS[name]), progress=False)
    return models


def _made_for(run_dir: Path, model: str) -> bool:
    """Whether the deltas in ``run_dir`` were made from ``model``'s current router weights
    (a run left from an older checkpoint of the same name is trained again)."""
    from roma_vllm.checkpoint import checkpoint_tensors
    from roma_vllm.deltas import fingerprint, read_deltas

    deltas = read_deltas(run_dir)
    base = checkpoint_tensors(model, deltas.base_fingerprints)
    return all(fingerprint(base[n]) == f for n, f in deltas.base_fingerprints.items())


def _run_name(model: str, params: dict[str, Any], seed: int) -> str:
    parts = [model] + [f"{k}={v}" for k, v in sorted(params.items())] + [f"seed{seed}"]
    return "_".join(parts).replace("/", "-")


def run_variants(
    chosen: list[Variant],
    models: dict[str, str],
    data: Path,
    seeds: list[int],
    shared: dict[str, Any],
    work: Path,
    jobs: int,
) -> dict[str, dict[str, Any]]:
    """Train every variant and its baseline for every seed; returns training records by run."""
    runs: dict[str, tuple[str, dict[str, Any], int]] = {}
    for v in chosen:
        for seed in seeds:
            for params in (
                {**shared, **v.baseline, "lambda": 0},
                {**shared, **v.baseline, **v.flags},
            ):
                runs.setdefault(_run_name(v.model, params, seed), (v.model, params, seed))

    def one(name: str) -> tuple[str, dict[str, Any]]:
        model, params, seed = runs[name]
        out = work / "runs" / name
        log = work / "logs" / f"{name}.log"
        if (out / "roma_deltas.safetensors").exists() and _made_for(out, models[model]):
            from roma_vllm.deltas import read_deltas

            return name, read_deltas(out).training
        log.parent.mkdir(parents=True, exist_ok=True)
        record = tune(models[model], data, out, seed, params, log)
        print(f"done {name}: val {record['val_accuracy_after']:.4f}", flush=True)
        return name, record

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per run: far faster than two
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, sorted(runs)))


def summarise(
    chosen: list[Variant], records: dict[str, dict[str, Any]], seeds: list[int], shared: dict
) -> list[dict[str, Any]]:
    rows = []
    for v in chosen:
        base_p = {**shared, **v.baseline, "lambda": 0}
        roma_p = {**shared, **v.baseline, **v.flags}
        rt = [records[_run_name(v.model, base_p, s)] for s in seeds]
        ro = [records[_run_name(v.model, roma_p, s)] for s in seeds]
        rt_acc = [r["val_accuracy_after"] for r in rt]
        ro_acc = [r["val_accuracy_after"] for r in ro]
        diff = paired_interval([a - b for a, b in zip(ro_acc, rt_acc, strict=True)])
        rows.append(
            {
                "variant": v.name,
                "what": v.what,
                "model": v.model,
                "flags": roma_p,
                "val_base": rt[0]["val_accuracy_before"],
                "router_tuning": mean_std(rt_acc),
                "roma": mean_std(ro_acc),
                "roma_minus_rt": {"mean": diff[0], "ci95": [diff[1], diff[2]]},
                "per_seed": {"router_tuning": rt_acc, "roma": ro_acc},
                "manifold_last_epoch": mean_std([r["epochs"][-1]["manifold"] for r in ro]),
            }
        )
    return rows


def markdown(record: dict[str, Any]) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [
        "# Why RoMA does not beat router tuning here: variants (validation split only)",
        "",
        f"Shared settings: {record['shared']}; seeds {record['seeds']}; "
        f"validation accuracy after the last epoch (%), mean ± std over seeds; "
        f"Δ = RoMA − router tuning paired by seed, 95% t interval. {record['runs']} runs, "
        f"{record['run_minutes']:.0f} min of tuner stages in all (embeddings, snapshots, "
        f"training); this invocation took {record['minutes']:.0f} min.",
        "",
        "| variant | what changes | base | router tuning | RoMA | Δ (points) | 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        d = r["roma_minus_rt"]
        lines.append(
            f"| {r['variant']} | {r['what']} | {pct(r['val_base'])} | "
            f"{pct(r['router_tuning'][0])} ± {pct(r['router_tuning'][1])} | "
            f"{pct(r['roma'][0])} ± {pct(r['roma'][1])} | {100 * d['mean']:+.1f} | "
            f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] |"
        )
    lines += [
        "",
        "## Transplant test (training split): is routing like the successful neighbours a fix?",
        "",
        "Share of the wrong answers that become right when the sample's last-token routing in "
        "the tuned layers is replaced by a target built from successful samples "
        "(`roma-tune diagnose transplant`).",
        "",
        "| model | wrong | neighbours (RoMA's target) | random same-task | random any task |",
        "|---|---|---|---|---|",
    ]
    for name, t in record["transplant"].items():
        cells = [
            f"{t[k]['fixed']}/{t[k]['tried']} ({pct(t[k]['fix_rate'])}%)"
            for k in ("neighbours", "random_same_task", "random_any")
        ]
        lines.append(f"| {name} | {t['wrong']}/{t['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    means = [100 * r["roma_minus_rt"]["mean"] for r in rows]
    lo = [m - 100 * r["roma_minus_rt"]["ci95"][0] for m, r in zip(means, rows, strict=True)]
    hi = [100 * r["roma_minus_rt"]["ci95"][1] - m for m, r in zip(means, rows, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    ax.errorbar(means, y, xerr=[lo, hi], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(y, [r["variant"] for r in rows])
    ax.set_xlabel("RoMA − router tuning, validation accuracy (points, 95% CI)")
    ax.set_title("RoMA variants vs plain router tuning")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


@app.command()
def main(
    data: Path = typer.Option(DEMO_DATA, help="Folder with train/val.jsonl."),
    seeds: str = typer.Option("0,1,2", help="Seeds (comma-separated)."),
    lr: float = typer.Option(1e-3, help="Learning rate of every run (Table 1's choice)."),
    lam: float = typer.Option(0.3, "--lambda", help="RoMA's lambda where a variant keeps it."),
    epochs: int = typer.Option(3, help="Epochs per run."),
    only: str = typer.Option("", help="Comma-separated variant names (default: all)."),
    jobs: int = typer.Option(2, help="Runs in parallel (one CPU thread each)."),
    out: Path = typer.Option(RESULTS, help="Where results go."),
    work: Path = typer.Option(ROOT / "runs/investigate", help="Scratch folder for runs."),
) -> None:
    """Run the variants and the transplant diagnostics; write investigation.md/json/png."""
    from tuner.diagnose.transplant import transplant_accuracy

    start = time.perf_counter()
    seed_list = [int(s) for s in seeds.split(",")]
    chosen = variants(lam)
    if only:
        names = only.split(",")
        unknown = sorted(set(names) - {v.name for v in chosen})
        if unknown:
            raise typer.BadParameter(f"unknown variant(s) {unknown}", param_hint="--only")
        chosen = [v for v in chosen if v.name in names]
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    models = build_models(work, data, {v.model for v in chosen})
    shared = {"lr": f"{lr:g}", "epochs": epochs}
    records = run_variants(chosen, models, data, seed_list, shared, work, jobs)
    transplant = {
        name: transplant_accuracy(path, str(data / "train.jsonl")) for name, path in models.items()
    }
    record = {
        "data": str(data),
        "seeds": seed_list,
        "shared": shared,
        "models": models,
        "rows": summarise(chosen, records, seed_list, shared),
        "transplant": transplant,
        "runs": len(records),
        "run_minutes": sum(sum(r["timings"].values()) for r in records.values()) / 60,
        "minutes": (time.perf_counter() - start) / 60,
    }
    write_json(out / "investigation.json", record)
    write_text(out / "investigation.md", markdown(record))
    plot(record, out / "investigation.png")
    print((out / "investigation.md").read_text())


if __name__ == "__main__":
    app()
