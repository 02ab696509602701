"""Where the routers live in a checkpoint.

Routers are found from the model itself (:mod:`roma_vllm.discovery`: the parameter
``[num_experts, hidden]`` beside the experts, in the model transformers builds from the
config on the meta device), then matched to checkpoint names through transformers' own
loading conversion (:func:`roma_vllm.hf.checkpoint_to_memory`). :func:`find_routers` does
that when it gets the config; every caller in the project passes it.

The table below is only for name checks that need no model: a delta file is read before any
model exists, and its tensor names must look like routers (:func:`roma_vllm.deltas.validate`;
the layer index comes from the name too). The architectures tested since the beginning keep
exact patterns there (so ``shared_expert_gate`` or an expert's ``gate_proj`` is refused on
sight); any other architecture gets :data:`GENERIC`, a layer tensor outside the experts, and
the exact check happens against the model's discovered routers when the deltas are applied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from roma_vllm.discovery import UnsupportedModelError

__all__ = [
    "GENERIC",
    "ROUTERS",
    "RouterSpec",
    "UnsupportedModelError",
    "architecture_of",
    "find_routers",
    "num_experts",
    "router_layers",
    "router_spec",
    "supported_architectures",
]


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

# Name check for every other architecture: a weight or bias of a decoder layer (also under
# a multimodal model's language_model), outside the experts, never the correction bias.
GENERIC = RouterSpec(
    "generic",
    r"(?:[\w.]+\.)?layers\.(\d+)\.(?![\w.]*experts\.)[\w.]+\.(?:weight|bias)",
)

# Every key configs use for the number of routed experts, and the sub-configs that hold it.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_NESTED_CONFIGS = ("text_config", "ffn_config")


def supported_architectures() -> list[str]:
    return sorted(ROUTERS)


def num_experts(config: Any) -> int | None:
    """Number of routed experts from a (Hugging Face) config object or dict."""
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    for key in EXPERT_COUNT_KEYS:
        value = get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for key in _NESTED_CONFIGS:
        sub = get(key)
        if sub is not None and (found := num_experts(sub)) is not None:
            return found
    return None


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
    architecture: str,
    shapes: Mapping[str, tuple[int, ...]],
    experts: int | None,
    config: Any = None,
) -> dict[str, int]:
    """Router tensor names (-> layer index) among checkpoint ``shapes``.

    With ``config`` (a transformers config, or its dict): the routers the model itself has
    (:func:`roma_vllm.discovery.routers_of`), under the checkpoint names transformers loads
    them from. Without it, names only: table architectures by their pattern, others by the
    generic pattern with ``shape == [experts, ...]``. Raises :class:`UnsupportedModelError`
    in one line when nothing matches.
    """
    if config is not None:
        return _find_discovered(architecture, shapes, config)
    spec = router_spec(architecture)
    found: dict[str, int] = {}
    for name, shape in shapes.items():
        layer = spec.match(name)
        if layer is None:
            continue
        if spec is GENERIC and (experts is None or len(shape) not in (1, 2) or shape[0] != experts):
            continue
        found[name] = layer
    if not found:
        raise UnsupportedModelError(
            f"no MoE routers found for architecture {architecture!r} (matched by name only, "
            f"without the model's config: no tensor matches {spec.pattern}"
            + ("" if spec is not GENERIC else f" with {experts} experts in its first dimension")
            + ")"
        )
    return dict(sorted(found.items(), key=lambda kv: (kv[1], kv[0])))


def router_layers(routers: Iterable[int] | Mapping[str, int]) -> list[int]:
    """Sorted distinct layer indices of a router map."""
    values = routers.values() if isinstance(routers, Mapping) else routers
    return sorted(set(values))


def _find_discovered(
    architecture: str, shapes: Mapping[str, tuple[int, ...]], config: Any
) -> dict[str, int]:
    from roma_vllm.discovery import discovered
    from roma_vllm.hf import checkpoint_to_memory, memory_to_checkpoint

    routers, model = discovered(config)
    owner = {p: r for r in routers for p in r.params}
    found: dict[str, int] = {}
    for ckpt, mem in checkpoint_to_memory(model, shapes).items():
        if mem not in owner:
            continue
        want = tuple(model.get_parameter(mem).shape)
        if tuple(shapes[ckpt]) != want:
            raise UnsupportedModelError(
                f"checkpoint tensor '{ckpt}' has shape {list(shapes[ckpt])} but the router "
                f"{mem} of {architecture} is {list(want)}: the checkpoint does not fit its config"
            )
        found[ckpt] = owner[mem].layer
    if not found:
        expected = memory_to_checkpoint(model, [routers[0].weight])[routers[0].weight]
        raise UnsupportedModelError(
            f"no MoE routers found for architecture {architecture!r}: the model's routers "
            f"(e.g. {routers[0].weight}, saved as {expected}) are not in the checkpoint"
        )
    return dict(sorted(found.items(), key=lambda kv: (kv[1], kv[0])))
