"""Pretrain a small MoE from scratch on the synthetic tasks, on CPU, in minutes.

The model is an OLMoE (or, with ``--arch qwen3moe``, a Qwen3-MoE) built from its
``transformers`` config, with a word-level tokenizer over the data's words. It is trained as
a language model on the pretraining phrasings with the loss on the answer word (cloze), a
lighter LM loss on the question, a per-layer load-balancing loss and a router z-loss. Each
prompt is used raw or wrapped in ``Question: ...\nAnswer:`` (the tuner's default loglik
template), half each, so the model works with either.

The result is a normal Hugging Face checkpoint (safetensors, bf16 by default) with its
tokenizer and a ``metrics.json`` (accuracy on held-out pretraining phrasings and on the
unseen downstream phrasings, per-task expert usage at the last prompt token, steps, wall
time, seed). Deterministic for a seed at a fixed step count (``--steps``); ``--minutes``
is only a safety cap, and metrics say when it cut the run short.

    python -m bench.synthetic.pretrain --data DIR --out DIR --seed 0

Modules: ``config`` (the run's settings), ``setup`` (tokenizer, model, encoded rows),
``losses`` (the training objective and schedule), ``metrics`` (accuracy and routing
statistics), ``train`` (the loop that writes the checkpoint), ``__main__`` (the command).
"""

from bench.synthetic.pretrain.config import (
    ARCHS,
    DOWNSTREAM_SPLITS,
    EXTRA_WORDS,
    N_HELDOUT,
    SPECIAL_TOKENS,
    WRAPPERS,
    PretrainConfig,
)
from bench.synthetic.pretrain.losses import (
    balance_loss,
    expert_groups,
    lr_at,
    route_loss,
    train_step,
    z_loss,
)
from bench.synthetic.pretrain.metrics import accuracy_by_task, evaluate, routing_stats
from bench.synthetic.pretrain.setup import (
    Encoded,
    build_model,
    build_tokenizer,
    encode,
    pad_batch,
    vocab_from_data,
)
from bench.synthetic.pretrain.train import pretrain

__all__ = [
    "ARCHS",
    "DOWNSTREAM_SPLITS",
    "EXTRA_WORDS",
    "N_HELDOUT",
    "SPECIAL_TOKENS",
    "WRAPPERS",
    "Encoded",
    "PretrainConfig",
    "accuracy_by_task",
    "balance_loss",
    "build_model",
    "build_tokenizer",
    "encode",
    "evaluate",
    "expert_groups",
    "lr_at",
    "pad_batch",
    "pretrain",
    "route_loss",
    "routing_stats",
    "train_step",
    "vocab_from_data",
    "z_loss",
]
