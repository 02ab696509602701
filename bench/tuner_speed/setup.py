"""Set-up shared by every variant: the configuration, a random OLMoE with its tokenizer,
the four-choice data, and the routing snapshot and neighbour targets."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS as RESULTS_DIR

RESULTS = RESULTS_DIR / "tuner_speed.json"
VARIANTS = ("naive", "ours", "ours_cached", "ours_dense")
TARGETS = {"speed_ours": 2.0, "speed_cached": 3.0, "memory": 0.5}


@dataclass
class Setup:
    """Model, data and training configuration shared by every variant."""

    layers: int = 16
    hidden: int = 256
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_width: int = 128
    vocab: int = 4096
    tuned: int = 5  # the last N routers (the default of `roma-tune run`)
    samples: int = 48
    min_words: int = 22  # question length in pseudo-words: prompts of ~64-128 tokens
    max_words: int = 50
    batch_size: int = 16
    epochs: int = 2
    lr: float = 1e-3
    lam: float = 0.8
    seed: int = 0
    threads: int = 1  # torch threads per variant process (see the module docstring)


def _pseudo_words(n: int, rng: random.Random) -> list[str]:
    onsets = [*"bcdfghklmnprstvz", "br", "st", "tr", "pl", "gr", "sh", "ch"]
    vowels = [*"aeiou", "ai", "ou", "ea"]
    return [
        "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
        for _ in range(n)
    ]


def build(work: Path, s: Setup) -> tuple[Path, Path]:
    """A random OLMoE of ``s``'s size with a ``s.vocab``-token BPE tokenizer, and
    ``s.samples`` four-choice rows whose prompts vary in length."""
    from roma_vllm.testing.tiny import build_tiny_model, corpus, train_tokenizer

    rng = random.Random(s.seed)
    lexicon = sorted(set(_pseudo_words(6000, rng)))
    texts = corpus() + [" ".join(rng.choices(lexicon, k=12)) for _ in range(4000)]
    tok = train_tokenizer(texts, vocab_size=s.vocab)
    model = build_tiny_model(
        work / "model",
        "OlmoeForCausalLM",
        seed=s.seed,
        tokenizer=tok,
        num_hidden_layers=s.layers,
        hidden_size=s.hidden,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        intermediate_size=s.expert_width,
    )
    rows = []
    for i in range(s.samples):
        question = " ".join(rng.choices(lexicon, k=rng.randint(s.min_words, s.max_words)))
        choices = rng.sample(lexicon, 4)
        rows.append({"question": question, "choices": choices, "answer": i % 4, "task": "t"})
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def tune_config(
    s: Setup, model: Path, data: Path, cache_frozen_layers: bool = False, router_grad: str = "topk"
) -> Any:
    """The ``roma-tune run`` configuration of ``s`` (what ``ours`` trains with)."""
    from tuner.config import TuneConfig

    return TuneConfig(
        model=str(model),
        data=str(data),
        out="",
        layers=f"last{s.tuned}",
        lam=s.lam,
        lr=s.lr,
        epochs=s.epochs,
        batch_size=s.batch_size,
        refresh="never",  # the snapshot pass is the same for both; time training only
        cache_frozen_layers=cache_frozen_layers,
        router_grad=router_grad,
        seed=s.seed,
    )


def load(s: Setup, work: Path) -> tuple[Any, list[Any]]:
    """The model and encoded rows, loaded and encoded by the tuner itself."""
    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples
    from tuner.model.load import load_model

    cfg = tune_config(s, work / "model", work / "train.jsonl")
    tm = load_model(cfg.model, cfg.layers, cfg.dtype, cfg.device)
    encoded = encode(load_examples(cfg.data).examples, tm.tokenizer, "letter")
    return tm, encoded


def make_targets(s: Setup, work: Path, tm: Any, encoded: list[Any]) -> tuple[Any, Any, dict]:
    """Routing snapshot and neighbours shared by every variant, saved in ``work``; returns
    them with a description of the data.

    Task embeddings are random unit vectors (seeded): which neighbours a sample gets does
    not change what a training step costs, and no embedder has to be loaded.
    """
    import numpy as np
    from safetensors.torch import save_file

    from tuner.roma.neighbours import find_neighbours
    from tuner.roma.snapshot import take_snapshot

    snap = take_snapshot(tm, encoded, s.batch_size)
    emb = np.random.default_rng(s.seed).standard_normal((len(encoded), 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    nb = find_neighbours(emb, snap.correct.numpy(), k=3, sigma=0.4)
    save_file({k: v.contiguous() for k, v in snap.tensors().items()}, str(work / "snap.st"))
    np.savez(work / "neighbours.npz", **nb.arrays())
    lengths = [len(e.prompt_ids) for e in encoded]
    info = {
        "prompt_tokens": {
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths),
        },
        "successful": int(snap.correct.sum()),
    }
    return snap, nb, info


def load_targets(work: Path) -> tuple[Any, Any]:
    """The snapshot and neighbours :func:`make_targets` saved."""
    import numpy as np
    from safetensors.torch import load_file

    from tuner.roma.neighbours import Neighbours
    from tuner.roma.snapshot import Snapshot

    snap = Snapshot.from_tensors(load_file(str(work / "snap.st")))
    with np.load(work / "neighbours.npz") as z:
        nb = Neighbours(z["index"], z["weight"], z["distance"])
    return snap, nb
