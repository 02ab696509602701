"""`roma-tune eval`: accuracy of the base and the tuned model, side by side, per task.

The default backend is vLLM with the roma plugin, the path users serve
(:mod:`tuner.evaluate.backends.vllm`); ``--backend hf`` uses transformers with the deltas added in
memory (:mod:`tuner.evaluate.backends.hf`). Both score identical token ids (:func:`tuner.data.prompts.encode`)
and report, per sample, the prediction and its margin; ``--check-against`` compares a run
with an earlier one (typically the other backend) and reports disagreements, which are
acceptable only as near-ties (margin below ``--tolerance``).

The JSON report (``--json``) holds the run's settings, ``overall`` (accuracy, correct, n and
near-ties per variant, plus ``changed_predictions``), ``per_task`` (the same per task) and
``samples`` (per sample and variant: prediction, correct, margin, choice scores or greedy
tokens); ``agreement`` is added by ``--check-against``.

Without ``--scoring`` / ``--template`` / ``--chat-template`` the values recorded in the
delta file's training config are used, so a tuned model is evaluated on prompts rendered as
in training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from roma_vllm import __version__
from tuner.evaluate.results import SampleScore, kind

if TYPE_CHECKING:
    from roma_vllm.deltas import RouterDeltas

BACKENDS = ("vllm", "hf")
DTYPES = ("float32", "bfloat16", "float16")
VARIANTS = ("base", "tuned")
DEFAULT_SCORING = "letter"
# Margins below this count as near-ties (log-probability units): kernels of two backends
# differ by ~1e-5 in float32 and by a few 1e-2 in 16-bit formats.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


@dataclass
class EvalOptions:
    """Everything that defines one evaluation."""

    model: str
    data: str
    deltas: str | None = None
    scoring: str | None = None  # None: from the deltas' training config, else "letter"
    template: str | None = None
    chat_template: bool | None = None
    backend: str = "vllm"
    dtype: str | None = None  # None: the checkpoint's
    scale: float = 1.0
    limit: int | None = None
    skip_bad_rows: bool = False
    allow_mismatch: bool = False
    tolerance: float | None = None  # None: DEFAULT_TOLERANCE of the dtype
    batch_rows: int = 16  # HF backend: rows per forward pass
    device: str = "auto"  # HF backend: auto (cuda when available), cpu or cuda
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"--backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"--scale: must be a finite number, got {self.scale}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device: must be auto, cpu or cuda, got {self.device!r}")
        if self.tolerance is not None and self.tolerance < 0:
            raise ValueError(f"--tolerance: must be >= 0, got {self.tolerance}")


# ------------------------------------------------------------------ inputs


def checkpoint_dtype(checkpoint: Path) -> str:
    """The dtype the checkpoint declares (config ``dtype``/``torch_dtype``), else its stored one."""
    from roma_vllm.checkpoint import load_config

    config = load_config(checkpoint)
    declared = config.get("dtype") or config.get("torch_dtype")
    if declared is None and isinstance(config.get("text_config"), dict):
        text = config["text_config"]
        declared = text.get("dtype") or text.get("torch_dtype")
    if isinstance(declared, str) and declared.replace("torch.", "") in DTYPES:
        return declared.replace("torch.", "")
    from safetensors import safe_open

    from roma_vllm.checkpoint import safetensors_files

    with safe_open(str(safetensors_files(checkpoint)[0]), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            stored = str(f.get_slice(name).get_dtype()).lower()
            return {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(stored, "bfloat16")
    return "bfloat16"


def training_config(deltas: Any) -> dict[str, Any]:
    """The run config recorded in a delta file (empty when there is none)."""
    training = getattr(deltas, "training", None) or {}
    config = training.get("config") if isinstance(training, dict) else None
    return config if isinstance(config, dict) else {}


@dataclass(frozen=True)
class Inputs:
    """The checkpoint, the checked deltas and the prompt settings a run scores with."""

    checkpoint: Path
    deltas: RouterDeltas | None
    scoring: str
    template: str | None
    chat: bool


class InputOptions(Protocol):
    """The options of a command that scores a model with optional deltas (eval, report)."""

    model: str
    deltas: str | None
    allow_mismatch: bool
    scoring: str | None
    template: str | None
    chat_template: bool | None


def resolve_inputs(opts: InputOptions) -> Inputs:
    """Resolve the checkpoint, read and check the deltas against it, and fill the prompt
    settings left unset from the deltas' training config (so prompts render as in training).

    ``template`` is a file holding the template or the template text itself (as in run).
    """
    from roma_vllm.checkpoint import resolve_checkpoint
    from roma_vllm.deltas import read_deltas
    from tuner.cli.run import read_template
    from tuner.export.merge import check_against_checkpoint

    checkpoint = resolve_checkpoint(opts.model)
    deltas = None
    recorded: dict[str, Any] = {}
    if opts.deltas is not None:
        deltas = read_deltas(opts.deltas)
        check_against_checkpoint(checkpoint, deltas, str(opts.deltas), opts.allow_mismatch)
        recorded = training_config(deltas)
    template = opts.template if opts.template is not None else recorded.get("template")
    chat = opts.chat_template
    return Inputs(
        checkpoint=checkpoint,
        deltas=deltas,
        scoring=opts.scoring or recorded.get("scoring") or DEFAULT_SCORING,
        template=read_template(template),
        chat=chat if chat is not None else bool(recorded.get("chat_template")),
    )


# ------------------------------------------------------------------ summaries


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
        raise ValueError(
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


# ------------------------------------------------------------------ running


def _score(
    opts: EvalOptions,
    checkpoint: Path,
    encoded: list[Any],
    deltas: Any,
    dtype: str,
    pad_id: int,
    progress: Callable[[str, int, int], Callable[[int], None]],
) -> dict[str, list[SampleScore]]:
    """Scores of the base model and, with deltas, the tuned one."""
    scores: dict[str, list[SampleScore]] = {}
    if opts.backend == "vllm":
        from tuner.evaluate.backends.vllm import num_requests, score_vllm

        total = num_requests(encoded)
        for variant in VARIANTS if deltas is not None else VARIANTS[:1]:
            scores[variant] = score_vllm(
                checkpoint,
                encoded,
                dtype=dtype,
                deltas_path=opts.deltas if variant == "tuned" else None,
                scale=opts.scale,
                allow_mismatch=opts.allow_mismatch,
                seed=opts.seed,
                progress=progress(f"{variant}: vLLM", total, 0),
            )
        return scores
    from tuner.evaluate.backends.hf import load_hf_model, score_hf
    from tuner.model.load import pick_device

    device = pick_device(opts.device)
    model = load_hf_model(checkpoint, dtype, device.type)
    for variant in VARIANTS if deltas is not None else VARIANTS[:1]:
        scores[variant] = score_hf(
            checkpoint,
            encoded,
            dtype=dtype,
            deltas=deltas if variant == "tuned" else None,
            scale=opts.scale,
            deltas_where=str(opts.deltas),
            batch_rows=opts.batch_rows,
            pad_id=pad_id,
            progress=progress(f"{variant}: transformers", len(encoded), 0),
            model=model,
        )
    return scores


def _no_progress(description: str, total: int, done: int) -> Callable[[int], None]:
    return lambda n: None


def evaluate(
    opts: EvalOptions,
    progress: Callable[[str, int, int], Callable[[int], None]] = _no_progress,
) -> dict[str, Any]:
    """Run one evaluation and return its report (what ``--json`` writes).

    ``progress(description, total, done)`` returns a callback advanced by finished units.
    """
    from transformers import AutoTokenizer

    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples

    inputs = resolve_inputs(opts)
    checkpoint, deltas = inputs.checkpoint, inputs.deltas
    dtype = opts.dtype or checkpoint_dtype(checkpoint)
    tolerance = opts.tolerance if opts.tolerance is not None else DEFAULT_TOLERANCE[dtype]

    data = load_examples(opts.data, skip_bad_rows=opts.skip_bad_rows, limit=opts.limit)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    encoded = encode(data.examples, tokenizer, inputs.scoring, inputs.template, inputs.chat)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    scores = _score(opts, checkpoint, encoded, deltas, dtype, pad_id, progress)
    tasks = [e.task for e in data.examples]
    overall, per_task = summarise(tasks, scores, tolerance)
    samples = []
    for i, (ex, enc) in enumerate(zip(data.examples, encoded, strict=True)):
        row: dict[str, Any] = {
            "index": i,
            "source": ex.source,
            "task": ex.task,
            "kind": kind(enc),
            "label": enc.label,
        }
        for variant, results in scores.items():
            row[variant] = results[i].to_json()
        samples.append(row)
    return {
        "roma_vllm_version": __version__,
        "model": opts.model,
        "checkpoint": str(checkpoint),
        "deltas": opts.deltas,
        "deltas_layers": deltas.layers if deltas is not None else None,
        "scale": opts.scale,
        "data": opts.data,
        "data_fingerprint": data.fingerprint,
        "skipped_rows": data.skipped,
        "backend": opts.backend,
        "dtype": dtype,
        "scoring": inputs.scoring,
        "template": inputs.template,
        "chat_template": inputs.chat,
        "tolerance": tolerance,
        "options": asdict(opts),
        "overall": overall,
        "per_task": per_task,
        "samples": samples,
    }


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


def main(
    opts: EvalOptions, json_out: str | None, plot: str | None, check_against: str | None
) -> None:
    """The `roma-tune eval` command: evaluate, print the table, write JSON and plot."""
    from rich.console import Console

    from tuner.progress import shared_bars

    other = None
    if check_against is not None:
        path = Path(check_against)
        if not path.is_file():
            raise FileNotFoundError(f"--check-against {check_against}: no such file")
        other = json.loads(path.read_text())
    console = Console()
    with shared_bars() as progress:
        report = evaluate(opts, progress)
    if other is not None:
        report["agreement"] = compare(report, other, report["tolerance"])
    console.print(table(report))
    for line in notes(report):
        console.print(line)
    if json_out:
        write_json(json_out, report)
        console.print(f"wrote {json_out}")
    if plot:
        from tuner.diagnose.plots import accuracy_bars

        accuracy_bars(report, plot)
        console.print(f"wrote {plot}")
    agreement = report.get("agreement") or {}
    if any(agreement.get(v, {}).get("disagreements") for v in VARIANTS):
        import typer

        typer.secho(
            f"Error: --check-against {check_against}: predictions disagree beyond near-ties "
            "(see the 'agreement' entry of the JSON report)",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
