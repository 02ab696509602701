"""``--router-grad dense``: top-k forward, dense-mixture backward (straight-through).

Plain router tuning reaches a router only through the weights of the k experts it picked,
so it cannot learn that an unpicked expert would have helped (DenseMixer's observation).
Within :class:`DenseRouterGrad`, every tuned MoE layer's routed-expert output becomes::

    out = topk.detach() + (dense - dense.detach())

* ``topk`` is what the model's own experts module returned for the router's top-k indices
  and weights: the forward value is exactly that (``dense - dense.detach()`` is exactly 0),
  so logits, losses and accuracies are those of the plain top-k model, bit for bit.
* ``dense = c * sum_e p_e * expert_e(x)``: the same experts module called with every
  expert for every token and weights ``c * p``, where ``p`` is the router's full
  distribution over experts and ``c`` the router's ``routed_scaling_factor`` (DeepSeek;
  1 elsewhere), so the dense mixture is on the scale of the top-k output. ``p`` is the
  softmax of the router logits for every architecture except DeepSeek-V3, whose router
  scores are sigmoids: there ``p`` is the sigmoid scores divided by their sum (the score
  correction bias only chooses experts and is left out, as in V3's own top-k weights).
* The backward is therefore that of ``dense`` alone: the router's gradient is
  ``d dense / d p`` (through every expert) and the block's input gets the dense mixture's
  gradient, so lower tuned routers see it too. The shared experts (Qwen2-MoE, DeepSeek) are
  outside the experts module and keep their own value and gradient.

The same routed part minus itself (the brief's ``out + (dense - topk) - (dense - topk).detach()``)
has the same value and gradient; detaching ``topk`` instead skips a backward through the
top-k experts that would cancel anyway.

Only the tuned layers take the dense path, which costs about ``E / k`` times the expert
compute there (every expert on every token). The hooks act only while autograd records
(``torch.is_grad_enabled()``): snapshots, validation and evaluation run under no-grad and
stay top-k even inside the context.
"""

from __future__ import annotations

from typing import Any

import torch

from roma_vllm.architectures import UnsupportedModelError
from tuner.model.load import TunerModel


def _block_of(tm: TunerModel, router: torch.nn.Module) -> torch.nn.Module:
    """The MoE block holding ``router`` (its parent module)."""
    for name, module in tm.model.named_modules():
        if module is router:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            return tm.model.get_submodule(parent)
    raise RuntimeError("router module not found in the model")  # a bug: routers come from it


def experts_of(tm: TunerModel, layer: int) -> torch.nn.Module:
    """The experts module called as ``experts(hidden, top_k_index, top_k_weights)`` in the
    MoE block of tuned ``layer``."""
    block = _block_of(tm, tm.router_modules[layer])
    experts = getattr(block, "experts", None)
    if not isinstance(experts, torch.nn.Module):
        raise UnsupportedModelError(
            f"--router-grad dense: the MoE block of layer {layer} "
            f"({type(block).__name__}, {tm.architecture}) has no 'experts' module"
        )
    return experts


def full_distribution(router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``[tokens, experts]`` float32 mixture weights ``c * p`` of the dense path (see module doc)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3: sigmoid scores
        scores = logits.sigmoid()
        p = scores / scores.sum(dim=-1, keepdim=True)
    else:
        p = torch.softmax(logits, dim=-1)
    scale = getattr(router, "routed_scaling_factor", None)
    return p * float(scale) if scale is not None else p


def dense_mixture(
    experts: torch.nn.Module, hidden: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_e weights[:, e] * expert_e(hidden)`` through the model's own experts module
    (its configured implementation; no hooks run)."""
    n, e = weights.shape
    index = torch.arange(e, device=hidden.device).expand(n, e)
    return experts.forward(hidden, index, weights.to(hidden.device))


class DenseRouterGrad:
    """Context manager: tuned MoE layers keep their top-k forward value and take the dense
    mixture's gradient (see the module doc)."""

    def __init__(self, tm: TunerModel) -> None:
        self.tm = tm
        self._logits: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> DenseRouterGrad:
        try:
            for layer, router in self.tm.router_modules.items():
                experts = experts_of(self.tm, layer)
                self._handles.append(router.register_forward_hook(self._keep_logits(layer)))
                self._handles.append(
                    experts.register_forward_hook(self._straight_through(layer), with_kwargs=True)
                )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._logits.clear()

    def _keep_logits(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if torch.is_grad_enabled():
                self._logits[layer] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _straight_through(self, layer: int) -> Any:
        router = self.tm.router_modules[layer]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            logits = self._logits.pop(layer, None)
            if logits is None:
                raise RuntimeError(  # a bug: every supported block runs its router first
                    f"--router-grad dense: the experts of layer {layer} ran before its router"
                )
            hidden = args[0] if args else kwargs["hidden_states"]
            weights = full_distribution(router, logits)
            if weights.shape[0] != hidden.shape[0]:
                raise RuntimeError(  # a bug: router and experts see the same tokens
                    f"--router-grad dense: layer {layer}'s router saw {weights.shape[0]} "
                    f"tokens and its experts {hidden.shape[0]}"
                )
            dense = dense_mixture(module, hidden, weights)
            return output.detach() + (dense - dense.detach())

        return hook


__all__ = [
    "DenseRouterGrad",
    "dense_mixture",
    "experts_of",
    "full_distribution",
]
