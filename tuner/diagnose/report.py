"""`roma-tune report`: does RoMA's premise hold for this model and data?

RoMA pulls a sample's routing towards the routing of samples that are close in a task
embedding space. That helps when routing already follows tasks to some degree. Two numbers
measure it, for the base routers and (with ``--deltas``) the tuned ones:

* **neighbour agreement**: the mean fraction of a sample's ``k`` nearest embedding neighbours
  (sentence embedding of the question, cosine) that are also among its ``k`` nearest routing
  neighbours (Euclidean distance of routing vectors), itself excluded from both. Random
  neighbours would give ``k / (n - 1)`` (reported as ``chance``).
* **expert purity**: for each task and layer, the share of the task's samples whose top-1
  expert (at the last prompt token) is the task's most common top-1 expert; averaged over
  tasks per layer and over everything.

Routing vectors are the tuner's own (:mod:`tuner.roma.snapshot`): softmax over experts of the
router logits at the last prompt token, concatenated over the analysed layers (by default
the layers the deltas tune, else the tuner's default layers). Plots: per-task expert usage
per layer (base and tuned side by side) and a 2-D PCA projection of the routing vectors
coloured by task. Everything goes into ``--out``: ``report.json`` and PNG files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roma_vllm import __version__
from tuner.config import DEFAULT_EMBEDDER, ConfigError

REPORT_FILENAME = "report.json"
BLOCK = 1024  # rows per block in the neighbour search (memory: BLOCK x n floats)


@dataclass
class ReportOptions:
    """Everything that defines one report."""

    model: str
    data: str
    out: str
    deltas: str | None = None
    scale: float = 1.0
    layers: str | None = None  # None: the deltas' layers, else the tuner's default
    k: int = 3
    embedder: str = DEFAULT_EMBEDDER
    scoring: str | None = None  # None: from the deltas' training config, else letter
    template: str | None = None
    chat_template: bool | None = None
    dtype: str | None = None  # None: float32 for float32 checkpoints, else bfloat16
    device: str = "auto"
    batch_size: int = 16
    limit: int | None = None
    skip_bad_rows: bool = False
    allow_mismatch: bool = False
    trust_remote_code: bool = False
    device_map: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k: must be at least 1, got {self.k}")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype: must be float32 or bfloat16, got {self.dtype!r}")


# ------------------------------------------------------------------ the two numbers


def nearest(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """``[n, k]`` indices of each row's ``k`` nearest other rows (ties: lower index first).

    ``metric``: ``cosine`` (rows need not be normalised) or ``euclidean``.
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise ConfigError(f"--k: needs 1 <= k < number of samples ({n}), got {k}")
    x = x.astype(np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    elif metric != "euclidean":
        raise ValueError(f"unknown metric {metric!r}")
    sq = (x * x).sum(1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, BLOCK):
        rows = np.arange(start, min(start + BLOCK, n))
        if metric == "cosine":
            dist = -(x[rows] @ x.T)
        else:
            dist = np.maximum(sq[rows, None] + sq[None, :] - 2 * (x[rows] @ x.T), 0.0)
        dist[np.arange(len(rows)), rows] = np.inf  # never its own neighbour
        out[rows] = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return out


def neighbour_agreement(embeddings: np.ndarray, routing: np.ndarray, k: int) -> float:
    """Mean share of the ``k`` embedding neighbours that are also routing neighbours."""
    a = nearest(embeddings, k, "cosine")
    b = nearest(routing, k, "euclidean")
    shared = [len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    return float(np.mean(shared) / k)


def top1_experts(routing: np.ndarray, num_layers: int) -> np.ndarray:
    """``[n, layers]`` top-1 expert per analysed layer from concatenated routing vectors."""
    n = routing.shape[0]
    return routing.reshape(n, num_layers, -1).argmax(-1)


def expert_purity(routing: np.ndarray, tasks: Sequence[str], layers: Sequence[int]) -> dict:
    """Per task and layer: share of samples whose top-1 expert is the task's commonest one."""
    top1 = top1_experts(routing, len(layers))
    labels = np.array(tasks)
    per_task: dict[str, dict[str, float]] = {}
    for task in sorted(set(tasks)):
        rows = top1[labels == task]
        per_task[task] = {
            str(layer): Counter(rows[:, j].tolist()).most_common(1)[0][1] / len(rows)
            for j, layer in enumerate(layers)
        }
    per_layer = {
        str(layer): float(np.mean([per_task[t][str(layer)] for t in per_task])) for layer in layers
    }
    return {
        "mean": float(np.mean(list(per_layer.values()))),
        "per_layer": per_layer,
        "per_task": per_task,
    }


def expert_usage(
    routing: np.ndarray, tasks: Sequence[str], num_layers: int
) -> dict[int, np.ndarray]:
    """Per layer position: ``[tasks (sorted), experts]`` mean router probability."""
    n = routing.shape[0]
    r = routing.reshape(n, num_layers, -1)
    labels = np.array(tasks)
    names = sorted(set(tasks))
    return {j: np.stack([r[labels == t, j].mean(0) for t in names]) for j in range(num_layers)}


# ------------------------------------------------------------------ running


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def routing_vectors(opts: ReportOptions, progress: Callable[..., Any] = _no_progress) -> dict:
    """Data, embeddings and routing vectors (base, and tuned with deltas) for a report."""
    from roma_vllm.hf import apply_deltas
    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples
    from tuner.evaluate.inputs import resolve_inputs
    from tuner.model.dtypes import checkpoint_dtype
    from tuner.model.load import load_model
    from tuner.roma.embed import embed_texts
    from tuner.roma.snapshot import take_snapshot

    inputs = resolve_inputs(opts)
    checkpoint, deltas = inputs.checkpoint, inputs.deltas
    layers = opts.layers
    if layers is None and deltas is not None:
        layers = ",".join(str(layer) for layer in deltas.layers)
    dtype = opts.dtype or ("float32" if checkpoint_dtype(checkpoint) == "float32" else "bfloat16")

    data = load_examples(opts.data, skip_bad_rows=opts.skip_bad_rows, limit=opts.limit)
    if opts.k >= len(data):
        raise ConfigError(f"--k: needs more than k={opts.k} samples, {opts.data} has {len(data)}")
    texts = [e.prompt for e in data.examples]
    embeddings = embed_texts(texts, opts.embedder, progress=progress("embeddings", len(texts)))
    tm = load_model(
        str(checkpoint), layers, dtype, opts.device, opts.trust_remote_code, opts.device_map
    )
    encoded = encode(data.examples, tm.tokenizer, inputs.scoring, inputs.template, inputs.chat)
    snaps = {
        "base": take_snapshot(
            tm, encoded, opts.batch_size, None, progress("base routing", len(encoded))
        )
    }
    if deltas is not None:
        apply_deltas(tm.model, deltas, opts.scale, allow_mismatch=True, where=str(opts.deltas))
        snaps["tuned"] = take_snapshot(
            tm, encoded, opts.batch_size, None, progress("tuned routing", len(encoded))
        )
    return {
        "data": data,
        "embeddings": embeddings,
        "layers": list(tm.layers),
        "num_experts": tm.num_experts,
        "architecture": tm.architecture,
        "scoring": inputs.scoring,
        "dtype": dtype,
        "routing": {v: s.routing.numpy().astype(np.float64) for v, s in snaps.items()},
        "accuracy": {v: s.accuracy for v, s in snaps.items()},
    }


def build_report(opts: ReportOptions, progress: Callable[..., Any] = _no_progress) -> dict:
    """Compute the numbers, write ``report.json`` and the plots into ``opts.out``."""
    from roma_vllm.deltas import atomic_write
    from tuner.diagnose.plots import routing_projection, usage_heatmaps

    got = routing_vectors(opts, progress)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    data = got["data"]
    tasks = [e.task for e in data.examples]
    layers = got["layers"]
    n = len(tasks)
    variants: dict[str, Any] = {}
    for variant, routing in got["routing"].items():
        variants[variant] = {
            "neighbour_agreement": neighbour_agreement(got["embeddings"], routing, opts.k),
            "expert_purity": expert_purity(routing, tasks, layers),
            "accuracy": got["accuracy"][variant],
        }
    files = []
    usage = {v: expert_usage(r, tasks, len(layers)) for v, r in got["routing"].items()}
    names = sorted(set(tasks))
    for j, layer in enumerate(layers):
        path = out / f"usage_layer{layer}.png"
        usage_heatmaps({v: u[j] for v, u in usage.items()}, names, layer, path)
        files.append(path.name)
    routing_projection(got["routing"], tasks, out / "routing_pca.png")
    files.append("routing_pca.png")
    report = {
        "roma_vllm_version": __version__,
        "model": opts.model,
        "architecture": got["architecture"],
        "deltas": opts.deltas,
        "data": opts.data,
        "data_fingerprint": data.fingerprint,
        "samples": n,
        "skipped_rows": data.skipped,
        "tasks": dict(sorted(Counter(tasks).items())),
        "layers": layers,
        "num_experts": got["num_experts"],
        "k": opts.k,
        "embedder": opts.embedder,
        "scoring": got["scoring"],
        "dtype": got["dtype"],
        "chance_agreement": opts.k / (n - 1),
        **variants,
        "files": files,
        "options": asdict(opts),
    }
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / REPORT_FILENAME, lambda tmp: Path(tmp).write_text(text))
    return report


def table(report: dict[str, Any]) -> Any:
    """The two numbers (and accuracy), base and tuned side by side."""
    from rich.table import Table

    variants = [v for v in ("base", "tuned") if v in report]
    t = Table(title=f"Routing report: {report['samples']} samples, layers {report['layers']}")
    t.add_column("")
    for v in variants:
        t.add_column(v, justify="right")
    t.add_row(
        f"neighbour agreement (k={report['k']}, chance {report['chance_agreement']:.3f})",
        *(f"{report[v]['neighbour_agreement']:.3f}" for v in variants),
    )
    t.add_row(
        "expert purity (mean over tasks, layers)",
        *(f"{report[v]['expert_purity']['mean']:.3f}" for v in variants),
    )
    for layer in report["layers"]:
        t.add_row(
            f"  layer {layer}",
            *(f"{report[v]['expert_purity']['per_layer'][str(layer)]:.3f}" for v in variants),
        )
    t.add_row("accuracy", *(f"{100 * report[v]['accuracy']:.1f}%" for v in variants))
    return t


def main(opts: ReportOptions) -> None:
    """The `roma-tune report` command."""
    from rich.console import Console

    from tuner.progress import shared_bars

    console = Console()
    with shared_bars() as progress:
        report = build_report(opts, progress)
    console.print(table(report))
    console.print(f"wrote {Path(opts.out) / REPORT_FILENAME} and {len(report['files'])} plots")
