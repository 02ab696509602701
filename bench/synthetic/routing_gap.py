"""How much accuracy is routing worth? Force every token to its task's own experts.

A model pretrained with ``--route-coef`` owns a group of experts per task
(``metrics.json`` -> ``expert_groups``). Forcing every token of a question, in every layer,
to the top-k experts of its task's group (``own``) shows what correct task routing would
give; forcing it to another task's group (``other``: the next task in sorted order) shows how
much the experts matter at all. ``own - base`` is the routing gap that router tuning can try
to close on that data; the per-sample oracle (:mod:`bench.oracle`) is a looser bound.

    python -m bench.synthetic.routing_gap --model bench/models/demo-olmoe --data bench/data/demo/val.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import typer

from bench.common import write_json
from bench.synthetic.pretrain import WRAPPERS, accuracy_by_task, encode, pad_batch
from bench.synthetic.tasks import read_jsonl
from tuner.diagnose.override import RouterOverride

BIAS = 30.0  # added to the chosen experts' logits: larger than any logit gap seen


def forced_routing(model: Any, bias: dict[str, torch.Tensor | None]) -> RouterOverride:
    """While active, every MoE router adds ``bias["rows"]`` (``[tokens, experts]``, or
    nothing when None) to its logits before choosing its top-k experts."""

    def edit(n: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None] | None:
        extra = bias["rows"]
        if extra is None:
            return None
        return torch.arange(len(logits)), logits + extra.to(logits), None

    return RouterOverride([layer.mlp.gate for layer in model.model.layers], edit)


@torch.no_grad()
def routing_gap(
    model_dir: str, data: str, wrapper: int = 1, last_only: bool = False, batch_size: int = 64
) -> dict:
    """Accuracy with the model's own routing, forced to the own task's experts and to
    another task's, overall and per task (``wrapper``: index into pretrain's WRAPPERS;
    ``last_only``: force only the last prompt token, the one whose routing RoMA aligns)."""
    from tuner.model.load import load_model

    groups = json.loads((Path(model_dir) / "metrics.json").read_text()).get("expert_groups")
    if not groups:
        raise ValueError(
            f"{model_dir}/metrics.json: no expert_groups (not pretrained with --route-coef)"
        )
    tm = load_model(model_dir, dtype="float32", device="cpu", train_routers=False)
    tok, model = tm.tokenizer, tm.model
    enc = encode(read_jsonl(Path(data)), tok)
    names = sorted(groups)
    n_exp = model.config.num_experts
    target = {
        "own": {t: groups[t] for t in names},
        "other": {t: groups[names[(i + 1) % len(names)]] for i, t in enumerate(names)},
    }
    bias: dict[str, torch.Tensor | None] = {"rows": None}
    correct: dict[str, list[bool]] = {"base": [], "own": [], "other": []}
    scores: dict[str, list[list[float]]] = {kind: [] for kind in correct}
    with forced_routing(model, bias):
        for start in range(0, len(enc.answers), batch_size):
            idx = list(range(start, min(start + batch_size, len(enc.answers))))
            ids, mask = pad_batch([enc.prompts[i][wrapper] for i in idx], tok.pad_token_id)
            last = mask.sum(1) - 1
            for kind in correct:
                bias["rows"] = None
                if kind != "base":
                    b = torch.zeros(len(idx), ids.shape[1], n_exp)
                    for j, i in enumerate(idx):
                        tokens = slice(int(last[j]), int(last[j]) + 1) if last_only else slice(None)
                        b[j, tokens, target[kind][enc.tasks[i]]] = BIAS
                    bias["rows"] = b.reshape(-1, n_exp)
                logits = model(input_ids=ids, attention_mask=mask).logits
                for j, i in enumerate(idx):
                    row = logits[j, last[j], enc.choices[i]]
                    correct[kind].append(int(row.argmax()) == enc.answers[i])
                    scores[kind].append(row.tolist())
    return {
        "data": str(data),
        "wrapper": WRAPPERS[wrapper],
        "last_only": last_only,
        **{kind: accuracy_by_task(c, enc.tasks) for kind, c in correct.items()},
        "choice_scores": scores,  # per kind, per row: the choices' logits
    }


app = typer.Typer(add_completion=False)


@app.command()
def main(
    model: str = typer.Option("bench/models/demo-olmoe", help="Checkpoint with expert_groups."),
    data: str = typer.Option("bench/data/demo/val.jsonl", help="Labelled rows."),
    raw: bool = typer.Option(False, help="Raw prompts instead of the Question/Answer wrapper."),
    last_only: bool = typer.Option(False, help="Force only the last prompt token's routing."),
    json_out: str = typer.Option(None, "--json", help="Write the result here."),
) -> None:
    """Print accuracy with the model's routing and with routing forced by task."""
    result = routing_gap(model, data, wrapper=0 if raw else 1, last_only=last_only)
    for kind in ("base", "own", "other"):
        per_task = " ".join(f"{t} {v:.2f}" for t, v in result[kind].items() if t != "all")
        print(f"{kind:5s} {result[kind]['all']:.3f}  ({per_task})")
    if json_out:
        write_json(Path(json_out), result)


if __name__ == "__main__":
    app()
