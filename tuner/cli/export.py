"""`roma-tune export`: router deltas in other formats (see :mod:`tuner.export.lora`)."""

from __future__ import annotations

import typer

from tuner.cli import options as o


def export_command(
    deltas: str = typer.Option(..., "--deltas", help="Router deltas (file or run folder)."),
    out: str = typer.Option(..., "--out", help="New folder for the exported adapter."),
    lora: bool = typer.Option(
        False, "--lora", help="Write a PEFT LoRA adapter on the routers (vLLM --enable-lora)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Base checkpoint (default: the base model the deltas record)."
    ),
    rank: int | None = typer.Option(
        None,
        "--rank",
        help="LoRA rank r < experts: truncated SVD, its routing error recorded "
        "(default: exact, rank = experts).",
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Data spec (as in run) on which to measure the router-logit error and the "
        "changed top-k choices of the adapter against the deltas.",
    ),
    limit: int | None = o.LIMIT,
    drop_bias: bool = typer.Option(
        False,
        "--drop-bias",
        help="Export only the router weights when the deltas hold router biases (GPT-OSS): "
        "a LoRA cannot carry a bias, so the tuned bias is lost.",
    ),
    allow_mismatch: bool = o.ALLOW_MISMATCH,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Export router deltas for serving without the plugin's merge (--lora: one adapter per
    tuned routing, chosen per request by vLLM's multi-LoRA)."""
    from tuner.cli.errors import exit_on_user_error
    from tuner.export.lora import LoraExportError, export_lora, summary

    with exit_on_user_error():
        if not lora:
            raise LoraExportError("choose the export format: --lora (the only one so far)")
        record = export_lora(
            deltas, out, model, rank, data, drop_bias, allow_mismatch, overwrite, limit
        )
        for line in summary(record, out):
            typer.echo(line)
