"""Router deltas and Hugging Face models in memory: name mapping and application.

Delta files use checkpoint tensor names. transformers 5 renames some of them when it loads a
model (Mixtral's ``block_sparse_moe.gate`` lives at ``mlp.gate`` in memory) and renames them
back when it saves. Both directions go through transformers' own conversion mapping:
:func:`checkpoint_to_memory` (loading, legacy names included, as ``from_pretrained`` does)
and :func:`memory_to_checkpoint` (saving, as ``save_pretrained`` does). A router is only ever
renamed; one that a conversion would fuse or split is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from roma_vllm.deltas import DeltaError, RouterDeltas, add_delta, check_base_tensor


def _conversions(model: Any, reverse: bool) -> tuple[list[Any], list[Any]]:
    """(renamings, converters) transformers applies when loading (or, reversed, saving)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    if reverse:  # as revert_weight_conversion does for a model not loaded from a checkpoint
        conv = getattr(model, "_weight_conversions", None)
        if conv is None:
            conv = get_model_conversion_mapping(model, add_legacy=False)
            conv = [c for c in conv if not isinstance(c, PrefixChange)]
        conv = [c.reverse_transform() for c in conv[::-1]]
    else:
        conv = get_model_conversion_mapping(model)
    renamings = [c for c in conv if isinstance(c, WeightRenaming)]
    converters = [c for c in conv if isinstance(c, WeightConverter)]
    return renamings, converters


def _state_keys(model: Any) -> dict[str, bool]:
    keys = dict.fromkeys((n for n, _ in model.named_parameters()), True)
    keys.update(dict.fromkeys((n for n, _ in model.named_buffers()), True))
    return keys


def memory_to_checkpoint(model: Any, names: Iterable[str]) -> dict[str, str]:
    """In-memory parameter name -> the name ``save_pretrained`` writes it under."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model, reverse=True)
    out = {}
    for name in names:
        saved, converter = rename_source_key(name, renamings, converters, reverse=True)
        if converter is not None:
            raise ValueError(f"{name}: transformers converts (not renames) this tensor on save")
        out[name] = saved
    return out


def checkpoint_to_memory(model: Any, names: Iterable[str]) -> dict[str, str | None]:
    """Checkpoint tensor name -> the in-memory parameter/buffer ``from_pretrained`` loads it
    into (None: no such tensor, or one that a conversion fuses with others)."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model, reverse=False)
    keys = _state_keys(model)
    prefix = getattr(model, "base_model_prefix", None) or None
    out: dict[str, str | None] = {}
    for name in names:
        loaded, converter = rename_source_key(name, renamings, converters, prefix, keys)
        if loaded not in keys and name in keys:  # as from_pretrained: keep the name
            loaded, converter = name, None
        out[name] = loaded if loaded in keys and converter is None else None
    return out


def hf_parameter(model: Any, checkpoint_name: str) -> torch.nn.Parameter:
    """The in-memory parameter of ``model`` that holds checkpoint tensor ``checkpoint_name``."""
    params = dict(model.named_parameters())
    if checkpoint_name in params:
        return params[checkpoint_name]
    loaded = checkpoint_to_memory(model, [checkpoint_name])[checkpoint_name]
    if loaded in params:
        return params[loaded]
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
