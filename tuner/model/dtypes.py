"""The one table of floating-point dtypes: names on the command line <-> torch dtypes, and
how a dtype is chosen for a run or read from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from tuner.config import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TRAIN_DTYPES = ("bfloat16", "float32")  # frozen weights while training (routers: float32)
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors header names


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` -> ``bfloat16`` on CUDA, ``float32`` elsewhere (CPU bf16 matmuls are ~10x
    slower than float32 on CPUs without native bf16); explicit names are kept."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in TRAIN_DTYPES:
        raise ConfigError(f"--dtype: must be auto, {' or '.join(TRAIN_DTYPES)}, got {dtype!r}")
    return dtype


def checkpoint_dtype(checkpoint: Path) -> str:
    """The dtype the checkpoint declares (config ``dtype``/``torch_dtype``), else its stored one."""
    from roma_vllm.checkpoint import load_config, safetensors_files

    config = load_config(checkpoint)
    declared = config.get("dtype") or config.get("torch_dtype")
    if declared is None and isinstance(config.get("text_config"), dict):
        text = config["text_config"]
        declared = text.get("dtype") or text.get("torch_dtype")
    if isinstance(declared, str) and declared.replace("torch.", "") in DTYPES:
        return declared.replace("torch.", "")
    from safetensors import safe_open

    with safe_open(str(safetensors_files(checkpoint)[0]), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            return _STORED.get(str(f.get_slice(name).get_dtype()).upper(), "bfloat16")
    return "bfloat16"
