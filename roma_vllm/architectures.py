"""Where the routers live, per architecture.

One table, keyed by the Hugging Face ``architectures`` name. Each entry gives a regular
expression that matches the checkpoint names of the router tensors (the linear gate over
the experts, ``[num_experts, hidden]``, plus its bias where the architecture has one).
Names that merely contain "gate" (the experts' ``gate_proj``, Qwen2-MoE's
``shared_expert_gate``) are deliberately not matched.

Architectures not in the table fall back to a generic pattern, accepted only when the
matched tensor's first dimension equals the config's expert count: any vLLM MoE whose router
is a plain linear gate works without a table entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from roma_vllm.errors import RomaError


@dataclass(frozen=True)
class RouterSpec:
    """How to find the routers of one architecture in its checkpoint."""

    architecture: str
    pattern: str  # regex over checkpoint tensor names; group 1 is the layer index
    has_bias: bool = False

    def match(self, name: str) -> int | None:
        """Layer index if ``name`` is a router tensor of this architecture, else None."""
        m = re.fullmatch(self.pattern, name)
        return int(m.group(1)) if m else None


_MLP_GATE = r"model\.layers\.(\d+)\.mlp\.gate\.weight"

ROUTERS: dict[str, RouterSpec] = {
    spec.architecture: spec
    for spec in [
        RouterSpec("OlmoeForCausalLM", _MLP_GATE),
        RouterSpec("Qwen2MoeForCausalLM", _MLP_GATE),
        RouterSpec("Qwen3MoeForCausalLM", _MLP_GATE),
        RouterSpec("DeepseekV2ForCausalLM", _MLP_GATE),
        RouterSpec("DeepseekV3ForCausalLM", _MLP_GATE),
        RouterSpec("MixtralForCausalLM", r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight"),
        RouterSpec(
            "GptOssForCausalLM", r"model\.layers\.(\d+)\.mlp\.router\.(?:weight|bias)", True
        ),
    ]
}

# Fallback for MoE architectures without an entry: a plain linear gate over the experts.
GENERIC = RouterSpec(
    "generic",
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe|moe|feed_forward)\.(?:gate|router)\.weight",
)

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


class UnsupportedModelError(RomaError, ValueError):
    """The model has no routers that roma-vllm knows how to tune."""


def supported_architectures() -> list[str]:
    return sorted(ROUTERS)


def num_experts(config: Any) -> int | None:
    """Number of routed experts from a (Hugging Face) config object or dict."""
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    for key in _EXPERT_COUNT_KEYS:
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = get("text_config")
    return num_experts(text) if text is not None else None


def architecture_of(config: Any) -> str:
    """The first entry of the config's ``architectures`` list."""
    archs = config.get("architectures") if isinstance(config, Mapping) else config.architectures
    if not archs:
        raise UnsupportedModelError("model config has no 'architectures' entry")
    return archs[0]


def router_spec(architecture: str) -> RouterSpec:
    """The table entry for ``architecture``, or the generic fallback."""
    return ROUTERS.get(architecture, GENERIC)


def find_routers(
    architecture: str, shapes: Mapping[str, tuple[int, ...]], experts: int | None
) -> dict[str, int]:
    """Router tensor names (-> layer index) among checkpoint ``shapes``.

    Table architectures are matched by name; the generic fallback additionally requires
    ``shape[0] == experts``. Raises :class:`UnsupportedModelError` when nothing matches.
    """
    spec = router_spec(architecture)
    found: dict[str, int] = {}
    for name, shape in shapes.items():
        layer = spec.match(name)
        if layer is None:
            continue
        if spec is GENERIC and (experts is None or len(shape) != 2 or shape[0] != experts):
            continue
        found[name] = layer
    if not found:
        raise UnsupportedModelError(
            f"no MoE routers found for architecture {architecture!r}; supported: "
            f"{', '.join(supported_architectures())} (and other models whose router is a "
            "linear gate named model.layers.N.mlp.gate.weight or similar)"
        )
    return dict(sorted(found.items(), key=lambda kv: (kv[1], kv[0])))


def router_layers(routers: Iterable[int] | Mapping[str, int]) -> list[int]:
    """Sorted distinct layer indices of a router map."""
    values = routers.values() if isinstance(routers, Mapping) else routers
    return sorted(set(values))
