"""Evaluation with transformers, through the tuner's own model loading and batched forward.

The model is loaded by :func:`tuner.model.load.load_model` with ``train_routers=False``: a
plain frozen model in the requested dtype, routers included (no float32 router masters,
unlike training), so it computes what a serving engine computes; deltas are added in memory.
Rows are collated and scored by :mod:`tuner.model.forward` exactly as in training: the
decoder runs once per batch and the LM head only at the scored positions. Single-token
options are reported as log-probabilities (their logits minus the log-normaliser over the
full vocabulary), so scores are comparable to vLLM's.

Free-form samples are scored by teacher forcing: greedy decoding reproduces the target iff
the target token is the argmax at every target position. ``generated`` then holds the greedy
tokens up to and including the first one that leaves the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from roma_vllm.deltas import RouterDeltas
from tuner.data.prompts import Encoded
from tuner.evaluate.results import SampleScore, choose, free_form
from tuner.model.forward import collate, decoder_hidden, head_scores, row_batches
from tuner.model.load import TunerModel, load_model


def load_eval_model(
    checkpoint: Path | str,
    dtype: str,
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> TunerModel:
    """The frozen model for evaluation: every weight, routers included, in ``dtype``."""
    return load_model(
        str(checkpoint),
        layers="all",
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
        train_routers=False,
    )


@torch.no_grad()
def _score_batch(
    tm: TunerModel, encoded: Sequence[Encoded], indices: list[int], pad_id: int
) -> list[SampleScore]:
    batch = collate(encoded, indices, pad_id).to(tm.device)
    head = head_scores(tm, decoder_hidden(tm, batch), batch, normalise=True)
    scores = head.choice_scores.cpu()
    logz = head.option_logz.cpu() if head.option_logz is not None else None
    top_values, top_ids = head.token_top2.values.cpu(), head.token_top2.indices.cpu()
    tok_sample = batch.tok_sample.cpu()

    out: list[SampleScore] = []
    for s, i in enumerate(indices):
        e = encoded[i]
        if e.option_ids is not None:
            assert logz is not None
            out.append(choose((scores[s, : len(e.option_ids)] - logz[s]).tolist(), e.label))
        elif e.continuations is not None:
            out.append(choose(scores[s, : len(e.continuations)].tolist(), e.label))
        else:
            target = e.target_ids or []
            pos = (tok_sample == s).nonzero()[:, 0]  # this sample's target positions, in order
            greedy = top_ids[pos, 0].tolist()
            gaps = (top_values[pos, 0] - top_values[pos, -1]).tolist()
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
    model: TunerModel | None = None,
) -> list[SampleScore]:
    """Score ``encoded`` with transformers; ``deltas`` (times ``scale``) added to the routers.

    The deltas must have been checked against the checkpoint already (see
    :func:`tuner.evaluate.inputs.resolve_inputs`): the loaded model may hold the routers in
    another dtype than the checkpoint, which would spoil a fingerprint check here.
    ``model`` reuses an already loaded base model (see :func:`load_eval_model`; its routers
    are changed in place when ``deltas`` are given). ``progress(n)`` is called after every
    batch of ``n`` samples.
    """
    from roma_vllm.hf import apply_deltas

    tm = model if model is not None else load_eval_model(checkpoint, dtype, device)
    if deltas is not None:
        apply_deltas(tm.model, deltas, scale, allow_mismatch=True, where=deltas_where)
    results: dict[int, SampleScore] = {}
    for batch in row_batches(encoded, batch_rows):
        results.update(zip(batch, _score_batch(tm, encoded, batch, pad_id), strict=True))
        if progress is not None:
            progress(len(batch))
    return [results[i] for i in range(len(encoded))]
