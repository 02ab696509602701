"""Set-up: the word-level tokenizer, a freshly initialised MoE, and the rows tokenised once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.synthetic.pretrain.config import (
    ARCHS,
    EXTRA_WORDS,
    SPECIAL_TOKENS,
    WRAPPERS,
    PretrainConfig,
)
from bench.synthetic.tasks import Row, read_jsonl, words


def build_tokenizer(vocab_words: list[str]) -> Any:
    """A lower-casing word-level tokenizer over ``vocab_words`` (plus specials)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(vocab_words) | set(EXTRA_WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # same split as tasks.words()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=256,
    )


def build_model(cfg: PretrainConfig, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised MoE of ``cfg.arch`` (seeded by the caller)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[cfg.arch])
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        num_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        router_aux_loss_coef=cfg.aux_coef,
        experts_implementation="eager",  # batched_mm is ~70x slower on CPU
    )
    if cfg.arch == "olmoe":
        extra = dict(intermediate_size=cfg.expert_width)
    else:
        extra = dict(
            head_dim=cfg.hidden // cfg.heads,
            intermediate_size=cfg.expert_width,
            moe_intermediate_size=cfg.expert_width,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    return model_cls(config_cls(**common, **extra))


def vocab_from_data(data: Path) -> list[str]:
    """Every word of every ``*.jsonl`` row (question and choices) under ``data``."""
    vocab: set[str] = set()
    for path in sorted(Path(data).glob("*.jsonl")):
        for row in read_jsonl(path):
            vocab.update(words(row["question"]))
            for choice in row["choices"]:
                vocab.update(words(choice))
    return sorted(vocab)


@dataclass
class Encoded:
    """Rows tokenised once: prompt ids per wrapper, choice ids, answer index, task."""

    prompts: list[list[list[int]]]  # [row][wrapper] -> ids
    choices: list[list[int]]
    answers: list[int]
    tasks: list[str]


def encode(rows: list[Row], tokenizer: Any, wrappers: tuple[str, ...] = WRAPPERS) -> Encoded:
    """Tokenise ``rows`` under each wrapper; every choice must be exactly one token."""
    prompts = [
        tokenizer([w.format(q=r["question"]) for r in rows], add_special_tokens=False)["input_ids"]
        for w in wrappers
    ]
    choices = []
    for i, r in enumerate(rows):
        ids = tokenizer(r["choices"], add_special_tokens=False)["input_ids"]
        if any(len(c) != 1 or c[0] == tokenizer.unk_token_id for c in ids):
            raise ValueError(
                f"row {i} ({r['task']}): every choice must be one known word, got {r['choices']}"
            )
        choices.append([c[0] for c in ids])
    return Encoded(
        prompts=[list(p) for p in zip(*prompts, strict=True)],
        choices=choices,
        answers=[int(r["answer"]) for r in rows],
        tasks=[str(r.get("task", "")) for r in rows],
    )


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs``: (input_ids, attention_mask). Rotary positions stay 0..len-1."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask
