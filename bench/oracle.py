"""Oracle routing: per-sample router weights optimised with the label (an upper bound).

For every sample, the tuned layers' routers start from the base weights and take up to
``steps`` Adam steps on that sample's own task loss (its label is known); the sample counts
as correct if the prediction is right at any point. Experts, attention and embeddings stay
frozen, so this measures how much accuracy routing alone can buy: the paper's "oracle" row
and the ceiling RoMA can approach.

    python -m bench.oracle --model bench/models/demo-olmoe --data bench/data/demo/test.jsonl
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import typer
from rich.progress import track

from bench.common import write_json

app = typer.Typer(add_completion=False)


def oracle_accuracy(
    model: str,
    data: str,
    scoring: str = "loglik",
    layers: str | None = None,
    steps: int = 10,
    lr: float = 0.05,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Base and oracle accuracy (overall and per task) of ``model`` on ``data``."""
    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples
    from tuner.model.choice_loss import score
    from tuner.model.forward import collate, forward
    from tuner.model.load import load_model
    from tuner.model.routing import RoutingCapture

    torch.manual_seed(0)
    tm = load_model(model, layers=layers, dtype="float32", device="cpu")
    examples = load_examples(data, limit=limit).examples
    encoded = encode(examples, tm.tokenizer, scoring)
    base_state = tm.router_state()
    pad = tm.tokenizer.pad_token_id
    base_ok: list[bool] = []
    oracle_ok: list[bool] = []
    steps_used: list[int] = []
    items = range(len(encoded))
    with RoutingCapture(tm) as cap:
        for i in track(items, description="oracle", disable=not progress):
            tm.load_router_state(base_state)
            opt = torch.optim.Adam(tm.parameters(), lr=lr)
            batch = collate(encoded, [i], pad)
            ok = False
            for step in range(steps + 1):
                out = forward(tm, batch, cap)
                s = score(out, batch)
                if step == 0:
                    base_ok.append(bool(s.correct[0]))
                if bool(s.correct[0]):
                    ok = True
                    break
                if step == steps:
                    break
                opt.zero_grad()
                s.loss.sum().backward()
                opt.step()
            oracle_ok.append(ok)
            steps_used.append(step)
    tm.load_router_state(base_state)
    return _summary(examples, base_ok, oracle_ok, steps, lr, tm.layers, steps_used)


def _summary(
    examples: list[Any],
    base_ok: list[bool],
    oracle_ok: list[bool],
    steps: int,
    lr: float,
    layers: list[int],
    steps_used: list[int],
) -> dict[str, Any]:
    per_task: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for ex, b, o in zip(examples, base_ok, oracle_ok, strict=True):
        per_task[ex.task].append((b, o))

    def acc(pairs: list[tuple[bool, bool]], k: int) -> float:
        return sum(p[k] for p in pairs) / max(len(pairs), 1)

    pairs = list(zip(base_ok, oracle_ok, strict=True))
    return {
        "n": len(pairs),
        "steps": steps,
        "lr": lr,
        "layers": layers,
        "mean_steps": sum(steps_used) / max(len(steps_used), 1),
        "base": acc(pairs, 0),
        "oracle": acc(pairs, 1),
        "per_task": {
            t: {"n": len(p), "base": acc(p, 0), "oracle": acc(p, 1)}
            for t, p in sorted(per_task.items())
        },
    }


@app.command()
def main(
    model: str = typer.Option("bench/models/demo-olmoe", help="Checkpoint."),
    data: str = typer.Option("bench/data/demo/test.jsonl", help="Labelled rows."),
    scoring: str = typer.Option("loglik", help="'letter' or 'loglik'."),
    layers: str = typer.Option(None, help="Routers to optimise (default: the tuner's)."),
    steps: int = typer.Option(10, help="Adam steps per sample."),
    lr: float = typer.Option(0.05, help="Adam learning rate."),
    limit: int = typer.Option(None, help="Only the first N rows."),
    json_out: str = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Print base and oracle accuracy."""
    result = oracle_accuracy(model, data, scoring, layers, steps, lr, limit)
    print(f"base {result['base']:.3f}  oracle {result['oracle']:.3f}  (n={result['n']})")
    if json_out:
        write_json(Path(json_out), result)


if __name__ == "__main__":
    app()
