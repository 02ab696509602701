"""What an evaluation backend returns per sample, and how a prediction is read from scores.

Both backends (:mod:`tuner.evaluate.backends.vllm`, :mod:`tuner.evaluate.backends.hf`) score the same
:class:`~tuner.data.prompts.Encoded` token ids and return one :class:`SampleScore` each:

* multiple choice: ``scores`` holds one log-likelihood per choice (the log-probability of the
  option token at the last prompt position, or the summed log-probabilities of a
  continuation); the prediction is the best choice (the first one on an exact tie);
* free-form: correct when greedy decoding reproduces the target ids exactly;
* lm-eval ``generate_until`` rows (GSM8K): correct when lm-eval's answer extraction and metric
  accept the greedy generation (:mod:`tuner.evaluate.generate`).

``margin`` measures how decisive the decision was: best minus second-best choice score, or
for free-form the smallest top-1 minus top-2 log-probability gap over the greedy steps up to
the first step that leaves the target. Two backends that compute the same function in
different kernels may only disagree where the margin is tiny (a near-tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tuner.data.prompts import Encoded


@dataclass
class SampleScore:
    """One sample's outcome under one model variant."""

    prediction: int  # chosen choice index; -1 for free-form
    correct: bool
    margin: float  # see the module docstring; inf when there is nothing to compare
    scores: list[float] | None = None  # per-choice log-likelihoods (multiple choice)
    generated: list[int] | None = None  # greedy token ids (free-form)
    # lm-eval generate_until rows (tuner.evaluate.generate): the generated text (cut at the
    # stop strings), the answer lm-eval's deciding filter extracted, and per filter its answer
    # and metrics
    text: str | None = None
    extracted: Any = None
    lm_eval: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["margin"] = _finite(self.margin)
        return {k: v for k, v in out.items() if v is not None}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def choose(scores: Sequence[float], label: int | None) -> SampleScore:
    """Prediction, correctness and margin from per-choice scores."""
    values = [float(s) for s in scores]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    rest = [v for i, v in enumerate(values) if i != best]
    margin = values[best] - max(rest) if rest else math.inf
    return SampleScore(best, label is not None and best == label, margin, scores=values)


def free_form(
    target: Sequence[int], generated: Sequence[int], gaps: Sequence[float]
) -> SampleScore:
    """Outcome of a free-form sample from greedy ``generated`` ids and their top-2 ``gaps``.

    ``gaps[t]`` is top-1 minus top-2 log-probability at greedy step ``t``; only the steps up
    to and including the first one that leaves ``target`` count towards the margin (later
    steps see a different context in teacher forcing and in generation).
    """
    correct = list(generated[: len(target)]) == list(target)
    steps = len(target)
    for t, (g, want) in enumerate(zip(generated, target, strict=False)):
        if g != want:
            steps = t + 1
            break
    margin = min(gaps[:steps], default=math.inf)
    return SampleScore(-1, correct, float(margin), generated=list(generated))


def kind(e: Encoded) -> str:
    """``option`` (single-token choices), ``loglik`` (continuations) or ``free``."""
    if e.option_ids is not None:
        return "option"
    if e.continuations is not None:
        return "loglik"
    return "free"


def max_length(encoded: Sequence[Encoded]) -> int:
    """Longest sequence any sample needs, prompt plus continuation or target."""
    return max(e.max_len for e in encoded)
