"""`roma-tune diagnose`: does RoMA's premise hold on a model and data set?

``report`` (also reachable as `roma-tune report`) and ``transplant``; see
:mod:`tuner.diagnose`.
"""

from __future__ import annotations

import typer

from tuner.cli import options as o

app = typer.Typer(
    help="Diagnostics: do embedding neighbours route alike, and does their routing help?",
    no_args_is_help=True,
)

DELTAS = typer.Option(
    None, "--deltas", help="Router deltas: report the tuned routing beside the base one."
)
LAYERS = typer.Option(
    None,
    "--layers",
    help="Layers to analyse ('all', 'lastN', '3,5', '2-5'). Default: the deltas' layers, "
    "else the last 5 MoE layers.",
)
DTYPE = typer.Option(
    None, "--dtype", help="float32 or bfloat16. Default: float32 for float32 checkpoints."
)
BATCH_SIZE = typer.Option(16, "--batch-size", help="Samples per forward pass.")


@app.command("report")
def report_command(
    model: str = o.MODEL,
    data: str = o.DATA,
    out: str = typer.Option(..., "--out", help="Folder for report.json and the PNG plots."),
    deltas: str | None = DELTAS,
    scale: float = o.SCALE,
    layers: str | None = LAYERS,
    k: int = typer.Option(3, "--k", help="Neighbours per sample for neighbour agreement."),
    embedder: str = o.EMBEDDER,
    scoring: str | None = o.SCORING,
    template: str | None = o.TEMPLATE,
    chat_template: bool | None = o.CHAT_TEMPLATE,
    dtype: str | None = DTYPE,
    device: str = o.DEVICE,
    device_map: str | None = o.DEVICE_MAP,
    trust_remote_code: bool = o.TRUST_REMOTE_CODE,
    batch_size: int = BATCH_SIZE,
    limit: int | None = o.LIMIT,
    skip_bad_rows: bool = o.SKIP_BAD_ROWS,
    allow_mismatch: bool = o.ALLOW_MISMATCH,
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
            trust_remote_code=trust_remote_code, device_map=device_map,
        )  # fmt: skip
        main(opts)


@app.command("transplant")
def transplant_command(
    model: str = o.MODEL,
    data: str = o.DATA,
    scoring: str = typer.Option("loglik", "--scoring", help="'letter' or 'loglik'."),
    template: str | None = o.TEMPLATE,
    layers: str | None = typer.Option(
        None, "--layers", help="Routers to transplant. Default: the tuner's (last 5 MoE layers)."
    ),
    k: int = typer.Option(3, "--k", help="Neighbours (and random samples) per target."),
    sigma: float = typer.Option(0.4, "--sigma", help="Gaussian kernel width."),
    embedder: str = o.EMBEDDER,
    limit: int | None = o.LIMIT,
    seed: int = typer.Option(0, "--seed", help="Seed of the random controls."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    device: str = o.DEVICE,
    trust_remote_code: bool = o.TRUST_REMOTE_CODE,
    batch_size: int = BATCH_SIZE,
    json_out: str | None = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Would a wrong sample be right if routed like its successful neighbours? Fix rates of
    neighbour routing against random successful routing (same task, any task)."""
    from tuner.cli.errors import exit_on_user_error
    from tuner.diagnose.transplant import main

    with exit_on_user_error():
        main(
            model, data, scoring=scoring, template=template, layers=layers, k=k, sigma=sigma,
            embedder=embedder, limit=limit, seed=seed, dtype=dtype, device=device,
            trust_remote_code=trust_remote_code, batch_size=batch_size, json_out=json_out,
        )  # fmt: skip
