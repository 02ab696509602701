"""``roma-tune eval`` of lm-eval ``generate_until`` rows (GSM8K), as lm-eval's ``vllm`` model
and evaluator score them.

A request is the row's context tokenised as lm-eval tokenises it (the whole context, BOS as
the tokenizer adds it), decoded greedily (temperature 0) for at most the task's
``max_gen_toks`` tokens, stopping at the task's ``until`` strings and the tokenizer's EOS text
(lm-eval adds it); special tokens are kept in the text, as lm-eval asks vLLM. The text is cut
at the first occurrence of each stop string (lm-eval's ``postprocess_generated_text``) and
judged by the task's own filters, ``process_results`` and metric
(:meth:`tuner.data.lmeval_generate.Generation.judge`).

Only the vLLM backend generates; ``--backend hf`` refuses such rows with one line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.config import ConfigError
from tuner.data.lmeval_generate import Generation
from tuner.data.prompts import prompt_token_ids
from tuner.data.sources import Example
from tuner.evaluate.results import SampleScore


@dataclass(frozen=True)
class GenRequest:
    """One greedy generation: prompt ids, stop strings, token budget, and how to judge it."""

    prompt_ids: list[int]
    stop: tuple[str, ...]
    max_tokens: int
    generation: Generation

    @property
    def max_len(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


def gen_requests(
    examples: Sequence[Example], tokenizer: Any, backend: str
) -> list[GenRequest | None]:
    """Per example, its :class:`GenRequest` (lm-eval ``generate_until`` rows) or None."""
    out: list[GenRequest | None] = []
    eos = _eos_text(tokenizer)
    for ex in examples:
        gen = ex.generation
        if gen is None:
            out.append(None)
            continue
        if backend != "vllm":
            raise ConfigError(
                f"{ex.source}: lm-eval generate_until rows ({ex.task}) are judged by generating "
                "with vLLM; use --backend vllm"
            )
        stop = tuple(gen.until) + ((eos,) if eos and eos not in gen.until else ())
        out.append(
            GenRequest(prompt_token_ids(tokenizer, gen.context), stop, gen.max_gen_toks, gen)
        )
    return out


def _eos_text(tokenizer: Any) -> str | None:
    """The EOS text lm-eval adds to the stop strings (``tokenizer.decode(eos_token_id)``)."""
    if tokenizer.eos_token_id is None:
        return None
    return tokenizer.decode(tokenizer.eos_token_id) or tokenizer.eos_token or None


def cut(text: str, stop: Sequence[str]) -> str:
    """``text`` before the first occurrence of each stop string, in order (as lm-eval)."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def judge_generation(
    req: GenRequest, text: str, token_ids: Sequence[int], gaps: Sequence[float]
) -> SampleScore:
    """Outcome of one generation; ``gaps`` are the top-1 minus top-2 log-probabilities of its
    steps (the smallest is the margin: how close greedy decoding came to another text)."""
    text = cut(text, req.stop)
    verdict = req.generation.judge(text)
    per_filter = {"decides": f"{verdict.metric},{verdict.filter}", **verdict.filters}
    margin = min(gaps, default=math.inf)
    return SampleScore(
        -1,
        verdict.correct,
        float(margin),
        generated=list(token_ids),
        text=text,
        extracted=verdict.extracted,
        lm_eval=per_filter,
    )
