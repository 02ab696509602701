"""`roma-tune run`: the command-line face of :mod:`tuner.run.pipeline`.

Options mirror :class:`tuner.config.TuneConfig` one to one and take their help text from it.
Heavy imports (torch, transformers) happen only when the command runs.
"""

from __future__ import annotations

import typer

from tuner.cli.errors import exit_on_user_error
from tuner.config import DEFAULTS, HELP, read_template


def _opt(name: str, *flags: str, **kw: object) -> object:
    return typer.Option(DEFAULTS[name], *flags, help=HELP[name], **kw)  # type: ignore[arg-type]


def run_command(
    model: str = typer.Option(..., "--model", help=HELP["model"]),
    data: str = typer.Option(..., "--data", help=HELP["data"]),
    out: str = typer.Option(..., "--out", help=HELP["out"]),
    val: str | None = _opt("val", "--val"),
    scoring: str = _opt("scoring", "--scoring"),
    template: str | None = _opt("template", "--template"),
    chat_template: bool = _opt("chat_template", "--chat-template"),
    layers: str | None = _opt("layers", "--layers"),
    k: int = _opt("k", "--k"),
    eps: float | None = _opt("eps", "--eps"),
    sigma: float = _opt("sigma", "--sigma"),
    lam: float = _opt("lam", "--lambda"),
    lr: float = _opt("lr", "--lr"),
    weight_decay: float = _opt("weight_decay", "--weight-decay"),
    epochs: int = _opt("epochs", "--epochs"),
    batch_size: int = _opt("batch_size", "--batch-size"),
    micro_batch_size: int | None = _opt("micro_batch_size", "--micro-batch-size"),
    max_length: int | None = _opt("max_length", "--max-length"),
    deterministic: bool = _opt("deterministic", "--deterministic"),
    warmup: float = _opt("warmup", "--warmup"),
    refresh: str = _opt("refresh", "--refresh"),
    routing_vector: str = _opt("routing_vector", "--routing-vector"),
    router_grad: str = _opt("router_grad", "--router-grad"),
    seed: int = _opt("seed", "--seed"),
    dtype: str = _opt("dtype", "--dtype"),
    cache_frozen_layers: bool = _opt("cache_frozen_layers", "--cache-frozen-layers"),
    cache_prefix: bool = typer.Option(False, "--cache-prefix", hidden=True),  # old spelling
    embedder: str = _opt("embedder", "--embedder"),
    skip_bad_rows: bool = _opt("skip_bad_rows", "--skip-bad-rows"),
    limit: int | None = _opt("limit", "--limit"),
    resume: bool = _opt("resume", "--resume"),
    overwrite: bool = _opt("overwrite", "--overwrite"),
    trust_remote_code: bool = _opt("trust_remote_code", "--trust-remote-code"),
    device: str = _opt("device", "--device"),
    device_map: str | None = _opt("device_map", "--device-map"),
    max_grad_norm: float | None = _opt("max_grad_norm", "--max-grad-norm"),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Show progress bars for every stage."
    ),
) -> None:
    """Train the routers of an MoE model with RoMA and write router deltas to RUN_DIR.

    Stages (each cached in RUN_DIR and reused when its inputs are unchanged): task
    embeddings, routing snapshot, neighbours, training, export of
    RUN_DIR/roma_deltas.safetensors (serve it with `vllm serve --load-format roma`).
    One run at a time uses a RUN_DIR (RUN_DIR/run.lock); an interrupted training continues
    with --resume or starts over with --overwrite, and is never deleted otherwise.

    Data parallel: `torchrun --nproc-per-node N $(which roma-tune) run ...` (--batch-size
    stays the global batch). A model larger than one GPU: --device-map auto.
    """
    values = dict(locals())
    values.pop("progress")
    values["cache_frozen_layers"] = values.pop("cache_prefix") or cache_frozen_layers
    with exit_on_user_error():
        from tuner.config import TuneConfig

        values["template"] = read_template(template)

        cfg = TuneConfig(**values)
        _run(cfg, progress)


def _run(cfg: object, progress: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from tuner.progress import Bars
    from tuner.run.pipeline import run
    from tuner.train.distributed import is_main_process

    hf_logging.disable_progress_bar()  # our own bars cover loading; keep stderr readable
    console = Console(stderr=True)
    # soft_wrap: long lines (paths) are left to the terminal, so they stay copyable
    echo = lambda msg: console.print(msg, markup=False, soft_wrap=True)  # noqa: E731
    result = run(cfg, Bars(progress, console), echo)  # type: ignore[arg-type]
    if not is_main_process():  # under torchrun rank 0 reports
        return
    table = Table(title="roma-tune run")
    table.add_column("epoch", justify="right")
    for col in ("loss", "task", "manifold", "train acc", "val acc", "samples/s"):
        table.add_column(col, justify="right")
    for r in result.history:
        table.add_row(
            str(r.epoch + 1),
            f"{r.loss:.4f}",
            f"{r.task_loss:.4f}",
            f"{r.manifold:.5f}",
            "-" if r.train_accuracy is None else f"{r.train_accuracy:.4f}",
            "-" if r.val_accuracy is None else f"{r.val_accuracy:.4f}",
            f"{r.samples_per_second:.1f}",
        )
    out = Console()
    out.print(table)
    out.print(f"train accuracy: {result.accuracy_before:.4f} -> {result.accuracy_after:.4f}")
    if result.val_before is not None:
        out.print(f"val accuracy:   {result.val_before:.4f} -> {result.val_after:.4f}")
    served = result.served
    if served and served.get("served_dtype") != "float32":
        val = served.get("val_accuracy_served")
        out.print(
            f"served precision ({served['served_dtype']} routers, as vLLM holds them): train "
            f"{served['train_accuracy_served']:.4f}"
            + (f", val {val:.4f}" if val is not None else "")
        )
    if result.truncated:
        out.print(f"prompts cut by --max-length: {result.truncated}")
    if result.reused:
        out.print(f"reused from cache: {', '.join(result.reused)}")
    out.print(f"deltas: {result.deltas}")
