"""`roma-tune`: train MoE routers with RoMA and evaluate the result."""

from __future__ import annotations

import typer

from roma_vllm import __version__
from tuner.cli.run import run_command

app = typer.Typer(
    help="Train MoE routers with routing manifold alignment (RoMA).", no_args_is_help=True
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"roma-tune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Train MoE routers with RoMA and evaluate them through vLLM."""


# heavy imports happen inside the command, so `roma-tune --help` stays fast
app.command("run")(run_command)


# ---------------------------------------------------------------- eval / merge / report
# Thin wrappers: each imports its module lazily so `roma-tune --help` stays fast.


@app.command("eval")
def eval_command(
    model: str = typer.Option(
        ..., "--model", help="Base checkpoint: a local folder or a Hub name."
    ),
    data: str = typer.Option(
        ...,
        "--data",
        help="Test data: .jsonl/.json/.csv, hf:NAME[:CONFIG]:SPLIT or a datasets folder.",
    ),
    deltas: str | None = typer.Option(
        None, "--deltas", help="Router deltas (file or run folder); tuned results beside base."
    ),
    scoring: str | None = typer.Option(
        None,
        "--scoring",
        help="'letter' or 'loglik'. Default: the scoring the deltas were trained with, else letter.",
    ),
    template: str | None = typer.Option(
        None, "--template", help="Prompt template (text or file). Default: the training one."
    ),
    chat_template: bool | None = typer.Option(
        None,
        "--chat-template/--no-chat-template",
        help="Wrap prompts in the model's chat template.",
    ),
    backend: str = typer.Option(
        "vllm", "--backend", help="'vllm' (with the roma plugin, as served) or 'hf' (transformers)."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32, bfloat16 or float16. Default: the checkpoint's dtype."
    ),
    scale: float = typer.Option(1.0, "--scale", help="Multiply the deltas by this factor."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N rows."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count bad rows."),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch", help="Apply deltas made for other base weights anyway."
    ),
    json_out: str | None = typer.Option(
        None, "--json", help="Write the full report (per sample too) here."
    ),
    plot: str | None = typer.Option(
        None, "--plot", help="Write a per-task accuracy bar plot (PNG) here."
    ),
    check_against: str | None = typer.Option(
        None,
        "--check-against",
        help="An earlier --json report on the same data (e.g. the other backend): report "
        "disagreements; exit 2 if any is not a near-tie.",
    ),
    tolerance: float | None = typer.Option(
        None,
        "--tolerance",
        help="Margin (log-prob) under which a decision is a near-tie. Default: 1e-3 (float32), "
        "0.1 (bfloat16), 0.05 (float16).",
    ),
    batch_rows: int = typer.Option(
        16, "--batch-rows", help="hf backend: sequences per forward pass."
    ),
    device: str = typer.Option(
        "auto", "--device", help="hf backend: 'auto' (cuda when available), 'cpu' or 'cuda'."
    ),
) -> None:
    """Accuracy of the base and the tuned model, overall and per task (vLLM by default)."""
    from tuner.cli.errors import exit_on_user_error
    from tuner.evaluate.core import EvalOptions, main

    with exit_on_user_error():
        opts = EvalOptions(
            model=model, data=data, deltas=deltas, scoring=scoring, template=template,
            chat_template=chat_template, backend=backend, dtype=dtype, scale=scale, limit=limit,
            skip_bad_rows=skip_bad_rows, allow_mismatch=allow_mismatch, tolerance=tolerance,
            batch_rows=batch_rows, device=device,
        )  # fmt: skip
        main(opts, json_out, plot, check_against)


@app.command("merge")
def merge_command(
    model: str = typer.Option(
        ..., "--model", help="Base checkpoint: a local folder or a Hub name."
    ),
    deltas: str = typer.Option(..., "--deltas", help="Router deltas (file or run folder)."),
    out: str = typer.Option(..., "--out", help="New folder for the merged checkpoint."),
    scale: float = typer.Option(1.0, "--scale", help="Multiply the deltas by this factor."),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch", help="Merge deltas made for other base weights anyway."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write a full checkpoint with the tuned routers, for engines without the plugin."""
    from tuner.cli.errors import exit_on_user_error
    from tuner.export.merge import main

    with exit_on_user_error():
        main(model, deltas, out, scale, allow_mismatch, overwrite)


@app.command("report")
def report_command(
    model: str = typer.Option(
        ..., "--model", help="Base checkpoint: a local folder or a Hub name."
    ),
    data: str = typer.Option(
        ..., "--data", help="Data (same formats as run/eval); tasks from 'task'."
    ),
    out: str = typer.Option(..., "--out", help="Folder for report.json and the PNG plots."),
    deltas: str | None = typer.Option(
        None, "--deltas", help="Router deltas: report the tuned routing beside the base one."
    ),
    scale: float = typer.Option(1.0, "--scale", help="Multiply the deltas by this factor."),
    layers: str | None = typer.Option(
        None,
        "--layers",
        help="Layers to analyse ('all', 'lastN', '3,5', '2-5'). Default: the deltas' layers, "
        "else the last 5 MoE layers.",
    ),
    k: int = typer.Option(3, "--k", help="Neighbours per sample for neighbour agreement."),
    embedder: str = typer.Option(
        "all-MiniLM-L6-v2", "--embedder", help="sentence-transformers model for task embeddings."
    ),
    scoring: str | None = typer.Option(
        None, "--scoring", help="'letter' or 'loglik'. Default: the deltas' training scoring."
    ),
    template: str | None = typer.Option(
        None, "--template", help="Prompt template (text or file). Default: the training one."
    ),
    chat_template: bool | None = typer.Option(
        None, "--chat-template/--no-chat-template", help="Wrap prompts in the chat template."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 or bfloat16. Default: float32 for float32 checkpoints."
    ),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda'."),
    batch_size: int = typer.Option(16, "--batch-size", help="Samples per forward pass."),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N rows."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count bad rows."),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch", help="Apply deltas made for other base weights anyway."
    ),
) -> None:
    """Routing diagnostics: neighbour agreement, expert purity, usage heatmaps, PCA plot."""
    from tuner.cli.errors import exit_on_user_error
    from tuner.diagnose.report import ReportOptions, main

    with exit_on_user_error():
        opts = ReportOptions(
            model=model, data=data, out=out, deltas=deltas, scale=scale, layers=layers, k=k,
            embedder=embedder, scoring=scoring, template=template, chat_template=chat_template,
            dtype=dtype, device=device, batch_size=batch_size, limit=limit,
            skip_bad_rows=skip_bad_rows, allow_mismatch=allow_mismatch,
        )  # fmt: skip
        main(opts)
