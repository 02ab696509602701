"""Find the routers of a Hugging Face MoE from the model itself, not from a name list.

The router of an MoE layer is the linear map whose output is the logits over the experts:
a parameter ``[num_experts, hidden]`` held directly by a module that sits beside the
experts (its parent or grandparent has a child named ``*experts``), outside the experts
container. A shared-expert gate (``[1, hidden]``), an expert's ``gate_proj`` and the
score-correction bias (``e_score_correction_bias``, used for selection only) are not
routers. A ``bias`` ``[num_experts]`` of the same module (GPT-OSS) is part of the router
and is tuned with it.

The model is instantiated on the ``meta`` device from its config (no memory, no weights),
so this is cheap enough for vLLM's process. Names are in-memory parameter names;
:mod:`roma_vllm.hf` maps them to and from checkpoint names with transformers' own
conversion mapping.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from roma_vllm.errors import RomaError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class UnsupportedModelError(RomaError, ValueError):
    """The model has no routers that roma-vllm knows how to tune."""


@dataclass(frozen=True)
class Router:
    """One router as transformers builds it (in-memory names)."""

    module: str  # the module that holds the weight
    weight: str  # ``[experts, hidden]``
    bias: str | None  # ``[experts]`` bias of the same module, tuned with the weight
    layer: int

    @property
    def params(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def layer_of(name: str) -> int | None:
    """Decoder layer index in a tensor or module name (``...layers.N...``), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def text_config(config: Any) -> Any:
    """The language model's config: ``text_config`` of a multimodal config, else ``config``."""
    sub = getattr(config, "get_text_config", None)
    return sub() if callable(sub) else getattr(config, "text_config", None) or config


def model_class(config: Any) -> type:
    """The transformers class for ``config.architectures[0]`` (the causal-LM auto-mapping
    for spellings transformers does not export, such as Phi-3.5-MoE's ``PhiMoEForCausalLM``)."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if isinstance(cls, type):
        return cls
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def meta_model(config: Any) -> Any:
    """``config``'s transformers model on the meta device (no memory, no weights)."""
    import torch

    cls = model_class(config)
    with torch.device("meta"):
        return cls._from_config(config)


def _near_experts(model: Any, module_name: str) -> bool:
    """Whether the parent or grandparent of ``module_name`` has a child named ``*experts``."""
    parts = module_name.split(".")
    for up in (1, 2):
        if len(parts) <= up:
            break
        parent = model.get_submodule(".".join(parts[:-up]))
        if any(child.endswith("experts") for child, _ in parent.named_children()):
            return True
    return False


def discover(model: Any, experts: int, hidden: int) -> tuple[list[Router], list[str]]:
    """Routers of ``model`` (built with ``experts`` experts of width ``hidden``), and why
    the closest other candidates were rejected (for the error when there is no router).

    A module named like a router (gate, router, classifier) may have more rows than routed
    experts: LongCat-Flash's router also scores its "zero" (identity) experts.
    """
    routers: list[Router] = []
    rejected: list[str] = []
    for mname, module in model.named_modules():
        inside_experts = any(p.endswith("experts") for p in mname.split("."))
        named = bool(re.search(r"gate$|router|classifier", mname.rsplit(".", 1)[-1]))
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if p.ndim != 2 or p.shape[-1] != hidden or pname != "weight" and not named:
                continue
            rows = int(p.shape[0])
            if rows != experts and not (named and rows > experts):
                if named and not inside_experts:
                    rejected.append(f"{full} {list(p.shape)} (not [experts={experts}, {hidden}])")
                continue
            layer = layer_of(full)
            why = (
                "inside an experts container"
                if inside_experts
                else "no decoder layer index"
                if layer is None
                else "no experts beside it"
                if not _near_experts(model, mname)
                else None
            )
            if why:
                if named:
                    rejected.append(f"{full} {list(p.shape)} ({why})")
                continue
            bias = getattr(module, "bias", None)
            has_bias = isinstance(bias, torch.Tensor) and tuple(bias.shape) == (rows,)
            routers.append(Router(mname, full, f"{mname}.bias" if has_bias else None, layer))
    return routers, rejected


_CACHE: dict[str, tuple[tuple[Router, ...], Any]] = {}


def _discover_uncached(config: Any, arch: str) -> tuple[tuple[Router, ...], Any]:
    experts, hidden = _experts_and_hidden(config)
    try:
        model = meta_model(config)
    except Exception:  # vLLM hands some models its own config class: rebuild transformers'
        from transformers import AutoConfig

        d = config.to_dict()
        model = meta_model(AutoConfig.for_model(d.pop("model_type"), **d))
    routers, rejected = discover(model, experts, hidden)
    if not routers:
        found = "; ".join(rejected[:4]) or "no gate/router/classifier parameter at all"
        raise UnsupportedModelError(
            f"{arch} has no linear router over its experts (no parameter "
            f"[num_experts={experts}, hidden={hidden}] beside the experts); closest: {found}"
        )
    return tuple(routers), model


def _experts_and_hidden(config: Any) -> tuple[int, int]:
    from roma_vllm.architectures import num_experts

    experts = num_experts(config)
    text = text_config(config)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", None)
    if not experts or not hidden:
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        raise UnsupportedModelError(
            f"{arch}: config has no routed experts (no num_experts / num_local_experts / "
            "n_routed_experts / moe_num_experts, also not in text_config): not an MoE model"
        )
    return experts, int(hidden)


def discovered(config: Any) -> tuple[list[Router], Any]:
    """The routers of the model ``config`` describes, and that model on the meta device
    (built once per config and cached).

    Raises :class:`UnsupportedModelError` in one line when the model has no linear router
    over its experts or transformers cannot build it from the config.
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = (d.get("architectures") or ["?"])[0]
    if not d.get("model_type"):
        raise UnsupportedModelError(f"{arch}: config has no 'model_type'")
    if not hasattr(config, "to_dict"):  # a config.json read as a dict
        from transformers import AutoConfig

        config = AutoConfig.for_model(
            d["model_type"], **{k: v for k, v in d.items() if k != "model_type"}
        )
    try:
        key = json.dumps(d, sort_keys=True, default=str)
        if key not in _CACHE:
            if len(_CACHE) >= 4:  # meta models are small, but configs differ per test model
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = _discover_uncached(config, arch)
        routers, model = _CACHE[key]
    except UnsupportedModelError:
        raise
    except Exception as e:  # transformers cannot build it: say so in one line
        msg = " ".join(str(e).split())[:300]
        raise UnsupportedModelError(
            f"cannot build {arch} from its config to find its routers ({type(e).__name__}: {msg})"
        ) from None
    return list(routers), model


def routers_of(config: Any) -> list[Router]:
    """The routers of the model ``config`` describes (see :func:`discovered`)."""
    return discovered(config)[0]
