"""``python -m bench.synthetic.pretrain``: the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bench.synthetic.pretrain.config import PretrainConfig
from bench.synthetic.pretrain.train import pretrain

app = typer.Typer(add_completion=False)


def _opt(help: str) -> Any:
    return typer.Option(help=help)


_D = PretrainConfig()  # CLI defaults


@app.command()
def main(
    data: Annotated[Path, _opt("Folder with pretrain.jsonl (train/val.jsonl are evaluated).")],
    out: Annotated[Path, _opt("Output folder: checkpoint, tokenizer, metrics.json.")],
    seed: Annotated[int, _opt("Seed for initialisation and batch sampling.")] = _D.seed,
    steps: Annotated[int, _opt("Optimizer steps (fixes the result for a seed).")] = _D.steps,
    minutes: Annotated[
        float, _opt("Safety cap on training time; stops early if hit.")
    ] = _D.minutes,
    arch: Annotated[str, _opt("olmoe or qwen3moe.")] = _D.arch,
    batch_size: Annotated[int, _opt("Sequences per step.")] = _D.batch_size,
    lr: Annotated[float, _opt("Peak learning rate (AdamW, warm-up then cosine).")] = _D.lr,
    experts: Annotated[int, _opt("Experts per MoE layer.")] = _D.experts,
    top_k: Annotated[int, _opt("Experts per token.")] = _D.top_k,
    layers: Annotated[int, _opt("Decoder layers.")] = _D.layers,
    hidden: Annotated[int, _opt("Hidden size (multiple of 32 for vLLM).")] = _D.hidden,
    heads: Annotated[int, _opt("Attention heads (head size = hidden / heads).")] = _D.heads,
    expert_width: Annotated[int, _opt("Intermediate size of each expert.")] = _D.expert_width,
    lm_weight: Annotated[float, _opt("Weight of the LM loss on question tokens.")] = _D.lm_weight,
    aux_coef: Annotated[float, _opt("Load-balancing loss coefficient.")] = _D.aux_coef,
    z_coef: Annotated[float, _opt("Router z-loss coefficient.")] = _D.z_coef,
    route_coef: Annotated[
        float,
        _opt(
            "Task-routing supervision: each task owns experts // tasks experts and prompt "
            "tokens are pushed to route there (0: routing learns freely)."
        ),
    ] = _D.route_coef,
    qa_tasks: Annotated[
        str,
        _opt(
            "Comma-separated tasks whose pretraining prompts always carry the "
            "'question: ... answer:' wrapper while every other task's never does (a format "
            "that marks one source); default: every prompt raw or wrapped, half each."
        ),
    ] = _D.qa_tasks,
    dtype: Annotated[str, _opt("Saved weight dtype: bfloat16 or float32.")] = _D.dtype,
    threads: Annotated[int, _opt("torch CPU threads (results can depend on it).")] = _D.threads,
) -> None:
    """Pretrain a small MoE on synthetic tasks and save it as a Hugging Face checkpoint."""
    cfg = PretrainConfig(
        arch=arch,
        seed=seed,
        steps=steps,
        minutes=minutes,
        batch_size=batch_size,
        lr=lr,
        experts=experts,
        top_k=top_k,
        layers=layers,
        hidden=hidden,
        heads=heads,
        expert_width=expert_width,
        lm_weight=lm_weight,
        aux_coef=aux_coef,
        z_coef=z_coef,
        route_coef=route_coef,
        qa_tasks=qa_tasks,
        dtype=dtype,
        threads=threads,
    )
    m = pretrain(data, out, cfg)
    acc = m["accuracy"]
    typer.echo(f"{m['steps']} steps in {m['train_seconds']} s; saved {out}")
    for key, val in acc.items():
        typer.echo(f"  accuracy {key}: {val['all']:.3f}")


if __name__ == "__main__":
    app()
