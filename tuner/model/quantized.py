"""Frozen weights of quantized checkpoints: transformers' quantizer, or dequantized here.

Router tuning needs the frozen weights only for forward passes, and the routers stay float
(:mod:`roma_vllm.quantization` refuses checkpoints whose routers are quantized). Per format:

* block FP8 (``weight_block_size``): transformers' own quantizer. On a GPU it runs the
  quantized kernels; on CPU it dequantizes to the run's dtype as it loads (it says so).
* MXFP4 (GPT-OSS): transformers' quantizer on a GPU; on CPU dequantized here with
  transformers' own ``convert_moe_packed_tensors`` (its quantizer would dequantize to bf16
  whatever the run's dtype, and a float32 run then fails in the first matmul).
* per-tensor FP8, compressed-tensors (int8 / packed int4 / fp8), GPTQ and AWQ: dequantized
  here, module by module as transformers reads them, into the run's dtype. transformers
  cannot run these on CPU (per-tensor FP8 reaches a matmul in float8; compressed-tensors
  int8 fails to convert; GPTQ and AWQ need optimum / gptqmodel, which would pull another
  torch).
* anything else: refused in one line.

The unquantized tensors stay lazy ``pread`` slices (:func:`tuner.model.weights.pread_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from roma_vllm.errors import RomaError
from roma_vllm.quantization import format_name, quantization_config
from tuner.model.weights import pread_state_dict

__all__ = [
    "QuantizationError",
    "dequantized_state_dict",
    "frozen_state_dict",
    "frozen_weight_sizes",
    "loads_quantized",
    "plain_config",
]

TRANSFORMERS = "transformers"  # transformers' quantizer loads the frozen weights
DEQUANTIZE = "dequantize"  # this module dequantizes them
_CT_FORMATS = ("int-quantized", "float-quantized", "naive-quantized", "pack-quantized")
# Per format: the tensors beside a quantized module's weight (read, then dropped).
_AUX = {
    "fp8": ("weight_scale", "input_scale", "weight_scale_inv"),
    "compressed-tensors": (
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
        "input_scale",
        "input_zero_point",
    ),
    "gptq": ("qzeros", "scales", "g_idx"),
    "awq": ("qzeros", "scales"),
    "mxfp4": ("scales",),
}


class QuantizationError(RomaError, ValueError):
    """The checkpoint's quantization cannot be loaded for tuning."""


def loads_quantized(
    config: Mapping[str, Any], where: str = "", device: torch.device | None = None
) -> str | None:
    """How the frozen weights load on ``device``: None (not quantized), ``transformers`` or
    ``dequantize``.

    Raises :class:`QuantizationError` for a format roma-tune cannot load.
    """
    q = quantization_config(config)
    if q is None:
        return None
    method = q.get("quant_method")
    if method == "fp8" and q.get("weight_block_size"):
        return TRANSFORMERS
    if method == "mxfp4":  # on CPU transformers dequantizes to bf16 whatever the run's dtype
        return TRANSFORMERS if device is not None and device.type == "cuda" else DEQUANTIZE
    if method in ("fp8", "gptq", "awq"):
        if method == "awq" and q.get("version", "gemm") != "gemm":
            raise QuantizationError(
                f"{where}: AWQ version {q.get('version')!r} cannot be loaded for tuning "
                "(supported: gemm)"
            )
        return DEQUANTIZE
    if method == "compressed-tensors" and q.get("format") in _CT_FORMATS:
        return DEQUANTIZE
    what = format_name(q) + (f" format {q.get('format')!r}" if q.get("format") else "")
    raise QuantizationError(
        f"{where}: quantization_config: {what} cannot be loaded for tuning; roma-tune loads "
        "fp8 (per-tensor and block), compressed-tensors (int-, float-, naive- and "
        "pack-quantized), mxfp4, gptq and awq checkpoints"
    )


def plain_config(hf_config: Any) -> Any:
    """``hf_config`` without its quantization_config (its weights arrive dequantized)."""
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    return hf_config


class _Dequantized:
    """A lazy dequantized weight: computed when transformers indexes it, like a pread slice."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], Any]):
        self.shape, self.dtype, self._make = shape, dtype, make

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._make().to(self.dtype)[index]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[self.dtype]


@contextmanager
def frozen_state_dict(
    ckpt: Path, config: Mapping[str, Any], dtype: torch.dtype
) -> Iterator[dict[str, Any]]:
    """The state dict to hand ``from_pretrained``: lazy ``pread`` slices, with quantized
    modules dequantized to ``dtype`` (:func:`dequantized_state_dict`) when there are any."""
    if loads_quantized(config, str(ckpt)) is None:
        with pread_state_dict(ckpt) as state:
            yield state
    else:
        with dequantized_state_dict(ckpt, config, dtype) as state:
            yield state


@contextmanager
def dequantized_state_dict(
    ckpt: Path, config: Mapping[str, Any], dtype: torch.dtype
) -> Iterator[dict[str, Any]]:
    """Name -> lazy tensor for every weight of ``ckpt``, quantized modules dequantized to
    ``dtype`` under their plain ``.weight`` names, the quantization tensors dropped."""
    q = quantization_config(config) or {}
    method = str(q.get("quant_method"))
    with pread_state_dict(ckpt) as stored:
        state: dict[str, Any] = {}
        consumed: set[str] = set()
        if method == "mxfp4":
            state.update(_mxfp4_experts(stored, dtype, consumed))
        for module, weight_name in _quantized_modules(stored, method):
            parts = {
                leaf: stored[f"{module}.{leaf}"]
                for leaf in (*_AUX[method], weight_name)
                if f"{module}.{leaf}" in stored
            }
            consumed.update(f"{module}.{leaf}" for leaf in parts)
            shape = _dequantized_shape(method, q, weight_name, parts)
            state[f"{module}.weight"] = _Dequantized(
                shape, dtype, _dequantizer(method, q, weight_name, parts)
            )
        state.update({n: t for n, t in stored.items() if n not in consumed and n not in state})
        yield state


def _mxfp4_experts(
    stored: Mapping[str, Any], dtype: torch.dtype, consumed: set[str]
) -> dict[str, Any]:
    """GPT-OSS's ``X_blocks`` / ``X_scales`` -> ``X`` [E, in, out], dequantized by
    transformers' own MXFP4 conversion."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out: dict[str, Any] = {}
    for name in stored:
        if not name.endswith("_blocks") or f"{name[:-7]}_scales" not in stored:
            continue
        base = name[:-7]
        blocks, scales = stored[name], stored[f"{base}_scales"]
        consumed.update({name, f"{base}_scales"})
        e, rows, groups, _ = blocks.get_shape()

        def make(b: Any = blocks, s: Any = scales) -> torch.Tensor:
            return convert_moe_packed_tensors(b[...], s[...], dtype=torch.float32)

        out[base] = _Dequantized((e, groups * 32, rows), dtype, make)
    return out


def _quantized_modules(stored: Mapping[str, Any], method: str) -> list[tuple[str, str]]:
    """(module, name of its stored weight) for every quantized module."""
    out = []
    for name, t in stored.items():
        module, _, leaf = name.rpartition(".")
        fp8 = method == "fp8" and leaf == "weight" and t.get_dtype().startswith("F8")
        ct = method == "compressed-tensors" and (
            leaf == "weight_packed" or (leaf == "weight" and f"{module}.weight_scale" in stored)
        )
        int4 = method in ("gptq", "awq") and leaf == "qweight"
        if fp8 or ct or int4:
            out.append((module, leaf))
    return out


def _bits(q: Mapping[str, Any]) -> int:
    if "bits" in q:
        return int(q["bits"])
    bits = {int(g["weights"]["num_bits"]) for g in q.get("config_groups", {}).values()}
    if len(bits) != 1:
        raise QuantizationError(
            f"quantization_config.config_groups: weights of {sorted(bits)} bits in one "
            "checkpoint cannot be loaded for tuning"
        )
    return bits.pop()


def _dequantized_shape(
    method: str, q: Mapping[str, Any], weight_name: str, parts: Mapping[str, Any]
) -> tuple[int, ...]:
    shape = tuple(parts[weight_name].get_shape())
    if method in ("gptq", "awq"):
        per_int = 32 // _bits(q)
        rows, cols = shape
        return (cols, rows * per_int) if method == "gptq" else (cols * per_int, rows)
    if weight_name == "weight_packed":
        return tuple(int(x) for x in parts["weight_shape"][...].tolist())
    return shape


def _dequantizer(
    method: str, q: Mapping[str, Any], weight_name: str, parts: Mapping[str, Any]
) -> Callable[[], torch.Tensor]:
    def read(leaf: str) -> torch.Tensor | None:
        return parts[leaf][...] if leaf in parts else None

    def make() -> torch.Tensor:
        if method == "fp8":
            return read("weight").float() * read("weight_scale").float()
        if method == "compressed-tensors":
            return _ct_dequantize(q, read)
        if method == "gptq":
            return _gptq_dequantize(q, read)
        return _awq_dequantize(q, read)

    return make


def _ct_dequantize(q: Mapping[str, Any], read: Callable[[str], Any]) -> torch.Tensor:
    """compressed-tensors' own unpacking and dequantization (its library ships with vLLM)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    packed = read("weight_packed")
    if packed is not None:
        shape = torch.Size(read("weight_shape").tolist())
        weight = unpack_from_int32(packed, _bits(q), shape)
    else:
        weight = read("weight")
    scale = read("weight_scale")
    return dequantize(weight, scale.float(), read("weight_zero_point"), g_idx=read("weight_g_idx"))


def _unpack(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 words -> their ``32 // bits`` codes along a new last axis, word k-th code first
    (``order``: AWQ's interleaving, code k of a word belongs to column order[k])."""
    per_int = 32 // bits
    shifts = torch.arange(per_int, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        codes = codes[..., torch.argsort(torch.tensor(order))]
    return codes


def _gptq_dequantize(q: Mapping[str, Any], read: Callable[[str], Any]) -> torch.Tensor:
    """AutoGPTQ layout: qweight [in/p, out] packed along the input, qzeros [groups, out/p]
    holding zero - 1 (format ``gptq``; ``gptq_v2`` stores the zero itself)."""
    bits = _bits(q)
    qweight, scales = read("qweight"), read("scales").float()
    codes = _unpack(qweight.T, bits).reshape(qweight.shape[1], -1).T  # [in, out]
    zeros = _unpack(read("qzeros"), bits).reshape(scales.shape)  # [groups, out]
    if q.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1
    g_idx = read("g_idx")
    if g_idx is None:
        g_idx = torch.arange(codes.shape[0]) // int(q["group_size"])
    g_idx = g_idx.long()
    return ((codes - zeros[g_idx]).float() * scales[g_idx]).T.contiguous()


def _awq_dequantize(q: Mapping[str, Any], read: Callable[[str], Any]) -> torch.Tensor:
    """AutoAWQ GEMM layout: qweight / qzeros packed along the output in the order
    0 2 4 6 1 3 5 7; scales [groups, out]."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    scales = read("scales").float()
    codes = _unpack(read("qweight"), 4, order).flatten(-2)  # [in, out]
    zeros = _unpack(read("qzeros"), 4, order).flatten(-2)  # [groups, out]
    group = codes.shape[0] // scales.shape[0]
    zeros, scales = zeros.repeat_interleave(group, 0), scales.repeat_interleave(group, 0)
    return ((codes - zeros).float() * scales).T.contiguous()


def frozen_weight_sizes(
    names_shapes_dtypes: Mapping[str, tuple[tuple[int, ...], str]],
    config: Mapping[str, Any],
    device: torch.device,
    where: str = "",
) -> tuple[int, int]:
    """(weights loaded in the run's dtype, bytes of weights kept as stored) for a checkpoint.

    ``names_shapes_dtypes``: name -> (shape, safetensors dtype string). Dequantized weights
    count at their dequantized size in the run's dtype; weights transformers keeps quantized
    (block FP8 and MXFP4 on a GPU) at their real, stored size. The quantization tensors of a
    dequantized module (scales, zero points) are not loaded at all.
    """
    plan = loads_quantized(config, where, device)
    if plan is None:
        return sum(math.prod(s) for s, _ in names_shapes_dtypes.values()), 0
    q = quantization_config(config) or {}
    aux = _AUX.get(str(q.get("quant_method")), ())
    keep_quantized = plan == TRANSFORMERS and device.type == "cuda"
    numel, stored = 0, 0
    for name, (shape, dtype) in names_shapes_dtypes.items():
        leaf, n = name.rpartition(".")[2], math.prod(shape)
        if leaf in aux or leaf.endswith("_scales"):  # scales, zero points: read, not loaded
            stored += n * _itemsize(dtype) if keep_quantized else 0
        elif dtype.startswith(("F8", "I8", "U8", "I32")):  # a quantized weight
            if keep_quantized:
                stored += n * _itemsize(dtype)
            else:  # codes per stored element: 8 / bits for packed words, 2 for MXFP4 bytes
                numel += n * (32 // _bits(q) if dtype == "I32" else 2 if dtype == "U8" else 1)
        else:
            numel += n
    return numel, stored


def _itemsize(dtype: str) -> int:
    sizes = {"F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2}
    return sizes.get(dtype, 8 if dtype.endswith("64") else 4)
