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
tokens; for lm-eval ``generate_until`` rows also the generated ``text``, the ``extracted``
answer and ``lm_eval``, every filter's answer and metrics); ``agreement`` is added by
``--check-against``.

Without ``--scoring`` / ``--template`` / ``--chat-template`` the values recorded in the
delta file's training config are used, so a tuned model is evaluated on prompts rendered as
in training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from roma_vllm import __version__
from roma_vllm.errors import MissingFileError
from tuner.config import ConfigError
from tuner.evaluate.generate import gen_requests
from tuner.evaluate.inputs import resolve_inputs
from tuner.evaluate.options import DEFAULT_TOLERANCE, VARIANTS, EvalOptions
from tuner.evaluate.results import SampleScore, kind
from tuner.evaluate.summary import compare, notes, summarise, table, write_json
from tuner.model.dtypes import checkpoint_dtype


def _score(
    opts: EvalOptions,
    checkpoint: Path,
    encoded: list[Any],
    deltas: Any,
    dtype: str,
    pad_id: int,
    progress: Callable[[str, int, int], Callable[[int], None]],
    gens: list[Any] | None = None,
) -> dict[str, list[SampleScore]]:
    """Scores of the base model and, with deltas, the tuned one."""
    scores: dict[str, list[SampleScore]] = {}
    if opts.backend == "vllm":
        from roma_vllm.settings import refuse_filtered_plugin
        from tuner.evaluate.backends.vllm import num_requests, score_vllm

        refuse_filtered_plugin(deltas_asked=deltas is not None)

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
                options=opts.engine(),
                progress=progress(f"{variant}: vLLM", total, 0),
                gens=gens,
            )
        return scores
    from tuner.evaluate.backends.hf import load_eval_model, score_hf

    model = load_eval_model(checkpoint, dtype, opts.device, opts.trust_remote_code, opts.device_map)
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
    tokenizer = AutoTokenizer.from_pretrained(
        str(checkpoint), trust_remote_code=opts.trust_remote_code
    )
    encoded = encode(data.examples, tokenizer, inputs.scoring, inputs.template, inputs.chat)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gens = gen_requests(data.examples, tokenizer, opts.backend)

    scores = _score(opts, checkpoint, encoded, deltas, dtype, pad_id, progress, gens)
    tasks = [e.task for e in data.examples]
    overall, per_task = summarise(tasks, scores, tolerance)
    samples = []
    for i, (ex, enc) in enumerate(zip(data.examples, encoded, strict=True)):
        row: dict[str, Any] = {
            "index": i,
            "source": ex.source,
            "task": ex.task,
            "kind": "generate" if gens[i] is not None else kind(enc),
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
            raise MissingFileError(f"--check-against {check_against}: no such file")
        try:
            other = json.loads(path.read_text(encoding="utf-8"))
            other["samples"], other["data_fingerprint"]  # noqa: B018 (what compare reads)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(
                f"--check-against {check_against}: not a `roma-tune eval --json` report ({e})"
            ) from None
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
