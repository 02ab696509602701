"""An OLMoE-1B-7B-shaped checkpoint: its config, its tensor names and shapes, and a file
that has them without the bytes (sparse), for checks that never read a weight.

The real model (allenai/OLMoE-1B-7B-0125) has 16 layers, hidden 2048, 64 experts of width
1024 with top-8 routing and a 50304-token vocabulary: 6.9B parameters, 13.8 GB in bf16.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

OLMOE_1B_7B: dict[str, Any] = dict(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    norm_topk_prob=False,
)
_SAFETENSORS_DTYPE = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def olmoe_config(dtype: str = "bfloat16", **overrides: Any) -> dict[str, Any]:
    """``config.json`` of an OLMoE-1B-7B-shaped model (``overrides`` change any field)."""
    import transformers

    config = transformers.OlmoeConfig(**{**OLMOE_1B_7B, **overrides})
    config.architectures = ["OlmoeForCausalLM"]
    out = config.to_dict()
    out["dtype"] = dtype
    return out


def olmoe_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of an OLMoE model, in the order HF saves them."""
    v, h = config["vocab_size"], config["hidden_size"]
    i, e = config["intermediate_size"], config["num_experts"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for x in range(e):
            shapes[p + f"mlp.experts.{x}.down_proj.weight"] = (h, i)
            shapes[p + f"mlp.experts.{x}.gate_proj.weight"] = (i, h)
            shapes[p + f"mlp.experts.{x}.up_proj.weight"] = (i, h)
        shapes[p + "mlp.gate.weight"] = (e, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.k_norm.weight"] = (kv,)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "self_attn.q_norm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (h, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_sparse_checkpoint(
    out_dir: str | os.PathLike, dtype: str = "float32", shard_bytes: int = 4 * 1024**3
) -> Path:
    """``config.json`` and safetensors shards (with their index, as Hugging Face saves large
    models) whose headers list every tensor of the 7B shape in ``dtype`` while their data
    regions are holes: the files take no disk space and read as zeros. Enough for everything
    that reads headers only: shapes, sizes, routers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = olmoe_config(dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    code, size = _SAFETENSORS_DTYPE[dtype]
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in olmoe_shapes(config).items():
        n = size * math.prod(shape)
        if used and used + n > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used += n
    weight_map: dict[str, str] = {}
    for k, tensors in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in tensors.items():
            n = size * math.prod(shape)
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
