"""Evaluation with transformers: the checkpoint as Hugging Face loads it, deltas added in memory.

A plain, frozen model in the requested dtype (no float32 router masters, unlike training) so
it computes what a serving engine computes. Rows are right-padded into batches; the decoder
runs once per batch and the LM head only at the scored positions (log-softmax over the full
vocabulary there, so scores are exact log-probabilities, comparable to vLLM's).

Free-form samples are scored by teacher forcing: greedy decoding reproduces the target iff
the target token is the argmax at every target position. ``generated`` then holds the greedy
tokens up to and including the first one that leaves the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from roma_vllm.deltas import RouterDeltas
from tuner.data.prompts import Encoded
from tuner.evaluate.results import SampleScore, choose, free_form

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_model(checkpoint: Path, dtype: str, device: str = "cpu") -> Any:
    """A frozen causal LM from ``checkpoint`` in ``dtype``."""
    import transformers

    from roma_vllm.architectures import architecture_of
    from roma_vllm.checkpoint import load_config

    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if device == "cpu":
        kwargs["experts_implementation"] = "eager"  # the batched kernels are far slower on CPU
    cls = getattr(transformers, architecture_of(load_config(checkpoint)), None)
    cls = cls or transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(checkpoint), **kwargs)
    except TypeError:  # a model class without the experts_implementation switch
        kwargs.pop("experts_implementation", None)
        model = cls.from_pretrained(str(checkpoint), **kwargs)
    model.to(device).eval().requires_grad_(False)
    return model


def _rows(e: Encoded) -> list[list[int]]:
    if e.continuations is not None:
        return [e.prompt_ids + c for c in e.continuations]
    if e.target_ids is not None:
        return [e.prompt_ids + e.target_ids]
    return [e.prompt_ids]


def _batches(encoded: Sequence[Encoded], max_rows: int) -> list[list[int]]:
    """Length-sorted sample groups of at most ``max_rows`` rows (one sample may exceed it)."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].max_len, i))
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i in order:
        n = len(_rows(encoded[i]))
        if current and rows + n > max_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def _score_batch(model: Any, encoded: Sequence[Encoded], pad_id: int) -> list[SampleScore]:
    seqs: list[list[int]] = []
    first_row: list[int] = []
    for e in encoded:
        first_row.append(len(seqs))
        seqs.extend(_rows(e))
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    hidden = model.get_decoder()(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
    ).last_hidden_state
    head = model.get_output_embeddings()

    # (row, position) of every scored position, per sample
    wanted: list[tuple[int, int]] = []
    for e, r0 in zip(encoded, first_row, strict=True):
        n = len(e.prompt_ids)
        if e.continuations is not None:
            for c, cont in enumerate(e.continuations):
                wanted += [(r0 + c, n - 1 + t) for t in range(len(cont))]
        elif e.target_ids is not None:
            wanted += [(r0, n - 1 + t) for t in range(len(e.target_ids))]
        else:
            wanted.append((r0, n - 1))
    rows_t = torch.tensor([w[0] for w in wanted], device=device)
    pos_t = torch.tensor([w[1] for w in wanted], device=device)
    logprobs = torch.log_softmax(head(hidden[rows_t, pos_t]).float(), dim=-1).cpu()

    out: list[SampleScore] = []
    k = 0
    for e in encoded:
        if e.option_ids is not None:
            out.append(choose(logprobs[k, e.option_ids].tolist(), e.label))
            k += 1
        elif e.continuations is not None:
            sums = []
            for cont in e.continuations:
                lp = logprobs[k : k + len(cont)]
                sums.append(float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
                k += len(cont)
            out.append(choose(sums, e.label))
        else:
            target = e.target_ids or []
            lp = logprobs[k : k + len(target)]
            k += len(target)
            top = lp.topk(min(2, lp.shape[-1]), dim=-1)
            greedy = top.indices[:, 0].tolist()
            gaps = (top.values[:, 0] - top.values[:, -1]).tolist()
            cut = next(
                (t + 1 for t, (g, w) in enumerate(zip(greedy, target, strict=True)) if g != w), None
            )
            out.append(free_form(target, greedy[:cut] if cut else greedy, gaps))
    return out


def score_hf(
    checkpoint: Path,
    encoded: Sequence[Encoded],
    *,
    dtype: str,
    deltas: RouterDeltas | None = None,
    scale: float = 1.0,
    deltas_where: str = "deltas",
    batch_rows: int = 16,
    device: str = "cpu",
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
    model: Any = None,
) -> list[SampleScore]:
    """Score ``encoded`` with transformers; ``deltas`` (times ``scale``) added to the routers.

    The deltas must have been checked against the checkpoint already (see
    :func:`tuner.evaluate.core.check_deltas`): the loaded model may hold the routers in another
    dtype than the checkpoint, which would spoil a fingerprint check here.
    ``model`` reuses an already loaded base model (its routers are changed in place when
    ``deltas`` are given). ``progress(n)`` is called after every batch of ``n`` samples.
    """
    from roma_vllm.hf import apply_deltas

    if model is None:
        model = load_hf_model(checkpoint, dtype, device)
    if deltas is not None:
        apply_deltas(model, deltas, scale, allow_mismatch=True, where=deltas_where)
    results: dict[int, SampleScore] = {}
    for batch in _batches(encoded, batch_rows):
        scored = _score_batch(model, [encoded[i] for i in batch], pad_id)
        results.update(zip(batch, scored, strict=True))
        if progress is not None:
            progress(len(batch))
    return [results[i] for i in range(len(encoded))]
