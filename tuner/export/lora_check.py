"""What a truncated (or bias-less) LoRA export changes in routing, measured on data.

Two forward passes of the base model per batch, through the tuner's own pieces (data
reading and prompt encoding from :mod:`tuner.data`, :func:`tuner.model.load.load_model`,
batches from :mod:`tuner.model.forward`, router logits from
:class:`tuner.model.routing.RoutingCapture`): one with the routers at ``base + delta`` (what
the delta file serves through the plugin), one at ``base + B @ A`` (what the adapter serves,
without any bias delta). Every token the model sees is compared, at every router the deltas
touch: the largest absolute router-logit difference, and how many (token, layer) pairs
choose a different top-k set of experts. Each pass routes its own hidden states, so a
change in a lower layer shows up in the layers above, as it would when serving.
"""

from __future__ import annotations

from typing import Any

import torch

from roma_vllm.deltas import RouterDeltas

BATCH_SIZE = 8


def _top_k(config: Any) -> int:
    for key in ("num_experts_per_tok", "experts_per_token", "top_k"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = config.get("text_config")
    if isinstance(text, dict):
        return _top_k(text)
    raise ValueError("model config names no experts-per-token count (num_experts_per_tok)")


def _prompt_settings(deltas: RouterDeltas) -> tuple[str, str | None, bool]:
    """(scoring, template, chat) as recorded by the run that made the deltas."""
    from tuner.config import read_template

    training = deltas.training if isinstance(deltas.training, dict) else {}
    cfg = training.get("config") if isinstance(training.get("config"), dict) else {}
    template = read_template(cfg["template"]) if cfg.get("template") else None
    return cfg.get("scoring") or "letter", template, bool(cfg.get("chat_template"))


@torch.no_grad()
def routing_error(
    model: str,
    deltas: RouterDeltas,
    products: dict[str, torch.Tensor],
    data: str,
    config: dict[str, Any],
    limit: int | None = None,
) -> dict[str, Any]:
    """Router-logit error and changed top-k choices of ``base + products`` (the adapter's
    weights) against ``base + deltas`` on the prompts of ``data``."""
    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples
    from tuner.model.forward import collate, sorted_batches
    from tuner.model.load import load_model
    from tuner.model.routing import RoutingCapture

    layers = ",".join(str(layer) for layer in deltas.layers)
    tm = load_model(model, layers=layers, dtype="float32", train_routers=True)
    exact = {n: b + deltas.tensors[n] if n in deltas.tensors else b for n, b in tm.base.items()}
    approx = {n: b + products[n] if n in products else b for n, b in tm.base.items()}
    scoring, template, chat = _prompt_settings(deltas)
    examples = load_examples(data, limit=limit).examples
    encoded = encode(examples, tm.tokenizer, scoring, template, chat)
    k = _top_k(config)
    worst, changed, routed, tokens = 0.0, 0, 0, 0
    with RoutingCapture(tm) as capture:
        for indices in sorted_batches(encoded, BATCH_SIZE):
            batch = collate(encoded, indices, tm.tokenizer.pad_token_id).to(tm.device)
            positions = batch.attention_mask.reshape(-1).nonzero()[:, 0]
            logits = []
            for state in (exact, approx):
                tm.load_router_state(state)
                capture.positions = positions
                tm.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
                logits.append({layer: t.float() for layer, t in capture.logits.items()})
                capture.logits = {}
            for layer, want in logits[0].items():
                got = logits[1][layer]
                worst = max(worst, float((got - want).abs().max()))
                same = (
                    torch.sort(want.topk(k, -1).indices, -1)[0]
                    == torch.sort(got.topk(k, -1).indices, -1)[0]
                )
                changed += int((~same.all(-1)).sum())
                routed += want.shape[0]
            tokens += int(positions.numel())
    capture.positions = None
    return {
        "data": data,
        "samples": len(encoded),
        "tokens": tokens,
        "layers": deltas.layers,
        "top_k": k,
        "max_logit_error": worst,
        "changed_topk": changed,
        "routed": routed,
        "changed_topk_fraction": changed / routed if routed else 0.0,
    }
