"""Accuracy recomputed from scratch, to check what the tuner reports.

Plain transformers, one unpadded row at a time, none of the tuner's code: the checkpoint is
loaded fresh, the saved deltas are added with :func:`roma_vllm.hf.apply_deltas` (the rule
the plugin and ``merge`` use), every letter is scored by the summed log-likelihood of
``" " + letter`` after the default letter prompt, and the best letter is the prediction.
(The tuner scores the letter token after a shared space token, which ranks the letters the
same way.) Rows whose best two letters are closer than ``TIE`` are reported apart: the
tuner's batched forward may order them either way, so a reported accuracy may differ by
such rows, but by at most ``MAX_TIE_DISAGREEMENTS`` of them however many there are.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TIE = 1e-4  # log-likelihood margin under which two letters count as a near-tie
# Batched and unbatched float32 forwards differ by ~1e-6 in a log-likelihood: a near-tie
# flips rarely. More flips than this is a scoring bug, not rounding (and a model whose rows
# are all near-ties must not match any accuracy).
MAX_TIE_DISAGREEMENTS = 2


@dataclass
class Recomputed:
    correct: list[bool]
    near_tie: list[bool]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    def matches(self, reported: float) -> bool:
        """``reported`` is this accuracy, up to rows that are near-ties, and at most
        ``MAX_TIE_DISAGREEMENTS`` of those."""
        n = len(self.correct)
        allowed = min(sum(self.near_tie), MAX_TIE_DISAGREEMENTS)
        return abs(reported - self.accuracy) <= allowed / n + 1e-6  # reported in float32


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit]


@torch.no_grad()
def letter_accuracy(
    model_dir: str | Path,
    rows: list[dict],
    deltas: str | Path | None = None,
    router_dtype: torch.dtype | None = None,
) -> Recomputed:
    """Accuracy of the base checkpoint (``deltas`` None) or base + deltas on ``rows``;
    ``router_dtype`` rounds the tuned routers to that dtype first (as vLLM holds them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roma_vllm.deltas import read_deltas
    from roma_vllm.hf import apply_deltas

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if deltas is not None:
        d = read_deltas(deltas)
        apply_deltas(model, d)
        if router_dtype is not None:
            from roma_vllm.hf import hf_parameter

            for name in d.tensors:
                p = hf_parameter(model, name)
                p.data = p.data.to(router_dtype).float()
    tok = AutoTokenizer.from_pretrained(model_dir)
    correct, near_tie = [], []
    for row in rows:
        letters = string.ascii_uppercase[: len(row["choices"])]
        listed = "\n".join(f"{x}. {c}" for x, c in zip(letters, row["choices"], strict=True))
        prompt = tok(f"Question: {row['question']}\n{listed}\nAnswer:")["input_ids"]
        scores = []
        for x in letters:
            cont = tok(" " + x, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([prompt + cont])).logits[0].float()
            logprobs = logits.log_softmax(-1)
            n = len(prompt)
            scores.append(sum(float(logprobs[n - 1 + i, t]) for i, t in enumerate(cont)))
        ranked = sorted(scores, reverse=True)
        correct.append(scores.index(ranked[0]) == row["answer"])
        near_tie.append(ranked[0] - ranked[1] < TIE)
    return Recomputed(correct, near_tie)
