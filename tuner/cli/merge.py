"""`roma-tune merge`: a full checkpoint with the tuned routers (see :mod:`tuner.export.merge`)."""

from __future__ import annotations

import typer

from tuner.cli import options as o


def merge_command(
    model: str = o.MODEL,
    deltas: str = typer.Option(..., "--deltas", help="Router deltas (file or run folder)."),
    out: str = typer.Option(..., "--out", help="New folder for the merged checkpoint."),
    scale: float = o.SCALE,
    allow_mismatch: bool = o.ALLOW_MISMATCH,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Write a full checkpoint with the tuned routers, for engines without the plugin."""
    from tuner.cli.errors import exit_on_user_error
    from tuner.export.merge import main

    with exit_on_user_error():
        main(model, deltas, out, scale, allow_mismatch, overwrite)
