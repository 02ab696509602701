"""`roma-tune eval`: base vs tuned accuracy (see :mod:`tuner.evaluate`)."""

from __future__ import annotations

import typer

from tuner.cli import options as o


def eval_command(
    model: str = o.MODEL,
    data: str = o.DATA,
    deltas: str | None = typer.Option(
        None, "--deltas", help="Router deltas (file or run folder); tuned results beside base."
    ),
    scoring: str | None = o.SCORING,
    template: str | None = o.TEMPLATE,
    chat_template: bool | None = o.CHAT_TEMPLATE,
    backend: str = typer.Option(
        "vllm", "--backend", help="'vllm' (with the roma plugin, as served) or 'hf' (transformers)."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32, bfloat16 or float16. Default: the checkpoint's dtype."
    ),
    scale: float = o.SCALE,
    limit: int | None = o.LIMIT,
    skip_bad_rows: bool = o.SKIP_BAD_ROWS,
    allow_mismatch: bool = o.ALLOW_MISMATCH,
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
    device: str = o.DEVICE,
    device_map: str | None = o.DEVICE_MAP,
    trust_remote_code: bool = o.TRUST_REMOTE_CODE,
    tensor_parallel_size: int = typer.Option(
        1, "--tensor-parallel-size", help="vllm backend: GPUs each engine splits every layer over."
    ),
    pipeline_parallel_size: int = typer.Option(
        1, "--pipeline-parallel-size", help="vllm backend: pipeline stages (groups of layers)."
    ),
    gpu_memory_utilization: float | None = typer.Option(
        None,
        "--gpu-memory-utilization",
        help="vllm backend: fraction of GPU memory an engine may take (0-1]. Default: vLLM's.",
    ),
    max_model_len: int | None = typer.Option(
        None,
        "--max-model-len",
        help="vllm backend: context length of the engines. Default: the longest request + 1.",
    ),
    enforce_eager: bool | None = typer.Option(
        None,
        "--enforce-eager/--no-enforce-eager",
        help="vllm backend: skip torch.compile and CUDA graphs. Default: vLLM's (compiled). "
        "On CPU pass --enforce-eager: compiling adds a minute or more to each engine's start.",
    ),
    verbose: bool = typer.Option(
        False, "--verbose", help="Print vLLM's own log (by default it goes to a temporary file)."
    ),
) -> None:
    """Accuracy of the base and the tuned model, overall and per task (vLLM by default)."""
    from tuner.cli.errors import exit_on_user_error
    from tuner.evaluate.core import main
    from tuner.evaluate.options import EvalOptions

    with exit_on_user_error():
        opts = EvalOptions(
            model=model, data=data, deltas=deltas, scoring=scoring, template=template,
            chat_template=chat_template, backend=backend, dtype=dtype, scale=scale, limit=limit,
            skip_bad_rows=skip_bad_rows, allow_mismatch=allow_mismatch, tolerance=tolerance,
            batch_rows=batch_rows, device=device, device_map=device_map,
            trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enforce_eager=enforce_eager, verbose=verbose,
        )  # fmt: skip
        main(opts, json_out, plot, check_against)
