"""Force routers' decisions at chosen tokens: the one router-override hook of the project.

A router module returns ``(logits, top-k weights, top-k indices)``. :class:`RouterOverride`
lets a callback replace the logits of chosen tokens (optionally with the routing
distribution to use); the top-k experts and their weights are then recomputed there as the
router itself would (softmax top-k, renormalised when the router renormalises, see
:func:`renormalises`). Every other token keeps the router's own output bit for bit.

Used by ``roma-tune diagnose transplant`` (route a sample like its neighbours) and by the
synthetic benchmark's forced task routing (``bench.synthetic.routing_gap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from roma_vllm.architectures import UnsupportedModelError
from tuner.model.routing import OverriddenOutput

# edit(n, logits) -> None (leave this router alone) or (positions [P], new logits [P, E],
# routing probabilities [P, E] or None for the softmax of the new logits)
Edit = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]


def renormalises(
    module: Any, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor
) -> bool:
    """Whether the router's top-k weights are its top-k softmax probabilities renormalised
    (Mixtral, GPT-OSS, Qwen3-MoE) or raw (OLMoE), read off its own output: Mixtral always
    renormalises but has no ``norm_topk_prob``. Ties (every top-k sums to ~1) fall back to
    that attribute; neither convention (DeepSeek's sigmoid scores) raises ValueError."""
    raw = torch.softmax(logits.float(), -1).gather(-1, index)
    norm = raw / raw.sum(-1, keepdim=True)
    is_raw, is_norm = (torch.allclose(weights.float(), x, atol=1e-3) for x in (raw, norm))
    if is_raw and is_norm:
        return bool(getattr(module, "norm_topk_prob", False))
    if not (is_raw or is_norm):
        raise UnsupportedModelError(
            f"{type(module).__name__}: its top-k weights are not softmax probabilities of its "
            "logits (raw or renormalised), so its routing cannot be overridden"
        )
    return is_norm


class RouterOverride:
    """Context manager: forward hooks on ``routers`` (in order; ``n`` is the position in that
    list) that apply ``edit``. ``prepend=True`` runs them before hooks registered earlier,
    e.g. a :class:`tuner.model.routing.RoutingCapture`, which then records the override."""

    def __init__(self, routers: Sequence[torch.nn.Module], edit: Edit, prepend: bool = False):
        self.routers = list(routers)
        self.edit = edit
        self.prepend = prepend
        self._handles: list[Any] = []

    def __enter__(self) -> RouterOverride:
        for n, module in enumerate(self.routers):
            self._handles.append(module.register_forward_hook(self._hook(n), prepend=self.prepend))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, n: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if not (isinstance(output, tuple) and len(output) == 3):
                raise ValueError(f"{type(module).__name__}: expected (logits, weights, indices)")
            change = self.edit(n, output[0])
            if change is None:
                return None
            pos, new_logits, probs = change
            renorm = renormalises(module, *output)
            logits, weights, index = (o.clone() for o in output)
            pos = pos.to(logits.device)
            new_logits = new_logits.to(logits.device)
            p = new_logits.float().softmax(-1) if probs is None else probs.to(logits.device)
            top_w, top_i = p.float().topk(index.shape[-1], dim=-1)
            if renorm:
                top_w = top_w / top_w.sum(-1, keepdim=True)
            logits[pos] = new_logits.to(logits.dtype)
            weights[pos] = top_w.to(weights.dtype)
            index[pos] = top_i.to(index.dtype)
            return OverriddenOutput((logits, weights, index))

        return hook
