"""An OLMoE-1B-7B-shaped checkpoint: its config, its tensor names and shapes, a file that
has them without the bytes (sparse), for checks that never read a weight, and the real
thing with random weights (:func:`write_random_checkpoint`), for benchmarks at real size.

The real model (allenai/OLMoE-1B-7B-0125) has 16 layers, hidden 2048, 64 experts of width
1024 with top-8 routing and a 50304-token vocabulary: 6.9B parameters, 13.8 GB in bf16.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable
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
    weight_map: dict[str, str] = {}
    for fname, tensors in _shards(olmoe_shapes(config), dtype, shard_bytes).items():
        head, data_bytes = _header(tensors, dtype)
        with open(out / fname, "wb") as f:
            f.write(head)
            f.truncate(len(head) + data_bytes)
        weight_map.update(dict.fromkeys(tensors, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _shards(
    shapes: dict[str, tuple[int, ...]], dtype: str, shard_bytes: int
) -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensors split in order into shards of at most ``shard_bytes`` (a larger tensor gets a
    shard of its own), keyed by the file names Hugging Face gives them."""
    size = _SAFETENSORS_DTYPE[dtype][1]
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in shapes.items():
        n = size * math.prod(shape)
        if used and used + n > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used += n
    return {f"model-{k:05d}-of-{len(shards):05d}.safetensors": s for k, s in enumerate(shards, 1)}


def _header(tensors: dict[str, tuple[int, ...]], dtype: str) -> tuple[bytes, int]:
    """A safetensors file's first bytes (length + JSON header, padded to 8) for ``tensors``
    stored in order, and the size of the data region that follows."""
    code, size = _SAFETENSORS_DTYPE[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        n = size * math.prod(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


# -- random weights --------------------------------------------------------------------------

INIT_STD = 0.02  # the config's initializer_range
ROUTER_GAIN = 4.0  # router std = ROUTER_GAIN / sqrt(hidden): logits of std ~4, decisive top-k
TOKENIZER_VOCAB = 512


def random_tensor(name: str, shape: tuple[int, ...], dtype: str, seed: int = 0) -> Any:
    """The weight :func:`write_random_checkpoint` stores under ``name``: norms are ones,
    routers N(0, (4 / sqrt(hidden))^2) as :mod:`roma_vllm.testing.tiny` draws them, every other
    tensor N(0, 0.02^2). Each tensor has its own generator (seeded by ``seed`` and its name),
    so any one can be redrawn alone."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch_dtype)
    # torch's CPU generator keeps 32 bits of its seed: mix the seed and the name into them
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed * 0x9E3779B1) % 2**32)
    std = ROUTER_GAIN / shape[-1] ** 0.5 if name.endswith("mlp.gate.weight") else INIT_STD
    return (torch.randn(shape, generator=g) * std).to(torch_dtype)


def write_random_checkpoint(
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    shard_bytes: int = 5 * 10**9,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Path:
    """An OLMoE-1B-7B-shaped checkpoint with random weights (:func:`random_tensor`): sharded
    safetensors with their index, ``config.json`` and a small trained BPE tokenizer, as
    Hugging Face saves a model; transformers and vLLM both load it.

    Written tensor by tensor: memory holds one tensor at a time, never a shard or the model
    (13.8 GB in bf16). Each shard is written under a temporary name and renamed when
    complete; the index is written last. The config keeps the real 50304-token vocabulary;
    the tokenizer's ids (``TOKENIZER_VOCAB``) are a prefix of it, as a real model's padded
    embedding is larger than its tokenizer. ``overrides`` change config fields (tests).
    """
    import torch

    from roma_vllm.deltas import atomic_write
    from roma_vllm.testing.tiny import corpus, train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus(), TOKENIZER_VOCAB)
    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    config = olmoe_config(dtype, **{**ids, **overrides})
    tok.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shards = _shards(olmoe_shapes(config), dtype, shard_bytes)
    weight_map: dict[str, str] = {}
    for fname, tensors in shards.items():
        if progress is not None:
            progress(f"writing {fname} ({len(tensors)} tensors)")

        def write(tmp: str, tensors: dict[str, tuple[int, ...]] = tensors) -> None:
            head, _ = _header(tensors, dtype)
            with open(tmp, "wb") as f:
                f.write(head)
                for name, shape in tensors.items():
                    t = random_tensor(name, shape, dtype, seed)
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)

        atomic_write(out / fname, write)
        weight_map.update(dict.fromkeys(tensors, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    atomic_write(
        out / "model.safetensors.index.json",
        lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)),
    )
    return out
