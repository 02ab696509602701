"""Router deltas and Hugging Face models in memory: name mapping and application.

Delta files use checkpoint tensor names. transformers 5 renames some of them when it loads a
model (Mixtral's ``block_sparse_moe.gate`` lives at ``mlp.gate`` in memory), so every
lookup goes through :func:`hf_parameter`, which applies the model's own renaming rules.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from roma_vllm.deltas import DeltaError, RouterDeltas, add_delta, check_base_tensor

# Renames transformers applies that matter for routers, used when its own table is unavailable.
_FALLBACK_RENAMES = [(r"\.block_sparse_moe\.", ".mlp.")]


def _renames(model: Any) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        for t in get_model_conversion_mapping(model):
            if isinstance(t, WeightRenaming):
                pairs += list(zip(t.source_patterns, t.target_patterns, strict=False))
    except Exception:  # older/newer transformers: fall back to the known renames
        pass
    return pairs + _FALLBACK_RENAMES


def hf_parameter(model: Any, checkpoint_name: str) -> torch.nn.Parameter:
    """The in-memory parameter of ``model`` that holds checkpoint tensor ``checkpoint_name``."""
    params = dict(model.named_parameters())
    if checkpoint_name in params:
        return params[checkpoint_name]
    for source, target in _renames(model):
        candidate = re.sub(source, target, checkpoint_name)
        if candidate in params:
            return params[candidate]
    raise KeyError(
        f"checkpoint tensor '{checkpoint_name}' has no parameter in {type(model).__name__}"
    )


@torch.no_grad()
def apply_deltas(
    model: Any,
    deltas: RouterDeltas,
    scale: float = 1.0,
    allow_mismatch: bool = False,
    where: str = "deltas",
) -> None:
    """Add ``scale * deltas`` to ``model``'s routers in place (float32 math, dtype kept).

    Checks shapes and base fingerprints first, so a mismatch leaves the model untouched.
    """
    targets = {}
    for name in deltas.tensors:
        try:
            param = hf_parameter(model, name)
        except KeyError as e:
            raise DeltaError(f"{where}: {e.args[0]}") from None
        check_base_tensor(deltas, name, param, where, allow_mismatch)
        targets[name] = param
    for name, param in targets.items():
        param.copy_(add_delta(param.data, deltas.tensors[name], scale))
