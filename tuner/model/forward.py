"""Batched forward passes that score only what is needed.

* Samples are collated into padded rows (right padding by default; left padding gets
  position ids from the attention mask), and each sample's last prompt token is located by
  its real length, never by the padded width.
* The decoder runs without the LM head; the head is applied only at scored positions:
  for single-token choices only the option rows of the head at the last prompt token (one
  dot product per option), for multi-token choices and free-form targets the full head at
  the continuation positions. ``[batch, seq, vocab]`` logits are never built.
* Batches are bucketed by length so padding stays small.
* With ``prefix`` (hidden states entering the lowest tuned layer, see :mod:`tuner.model.frozen_cache`)
  the layers below it are skipped: they are swapped for pass-through modules and the cached
  states are fed to the lowest tuned layer, so layer indices, masks and rotary positions are
  those of the full model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tuner.data.prompts import Encoded
from tuner.model.load import TunerModel
from tuner.model.routing import RoutingCapture


@dataclass
class Batch:
    """Collated samples; flat positions index ``hidden.view(rows * seq, hidden)``."""

    indices: list[int]  # dataset indices of the samples, in order
    rows: list[tuple[int, int]]  # (sample position in batch, row j of that sample) per row
    row_lengths: list[int]
    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, T]
    position_ids: torch.Tensor  # [R, T]
    left_padded: bool
    last: torch.Tensor  # [S] flat index of each sample's last prompt token
    labels: torch.Tensor  # [S] correct choice, -1 for free-form
    is_free: torch.Tensor  # [S] bool
    cmax: int  # widest choice list (>= 1)
    opt_flat: torch.Tensor  # [O] single-token options: flat position (the last prompt token)
    opt_token: torch.Tensor  # [O] the option's token id
    opt_slot: torch.Tensor  # [O] sample * cmax + choice
    tok_flat: torch.Tensor  # [P] full-vocab positions: flat position predicting the target
    tok_target: torch.Tensor  # [P] target token id
    tok_slot: torch.Tensor  # [P] sample * cmax + choice (multi-token choices), -1 free-form
    tok_sample: torch.Tensor  # [P] sample position in batch
    choice_mask: torch.Tensor  # [S, cmax] True where the sample has that choice

    @property
    def size(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device) -> Batch:
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self


@dataclass
class Outputs:
    """What a forward pass yields for the loss and for correctness."""

    choice_scores: torch.Tensor  # [S, cmax] float32, -inf where a sample has no such choice
    token_logprobs: torch.Tensor  # [P] log-prob of each full-vocab target token
    token_hit: torch.Tensor  # [P] bool, the target is the argmax
    routing: torch.Tensor  # [S, layers * experts]


def _rows_of(e: Encoded) -> list[list[int]]:
    if e.continuations is not None:
        if e.prompts is not None:  # multiple input: one prompt per choice
            return [p + c for p, c in zip(e.prompts, e.continuations, strict=True)]
        return [e.prompt_ids + c for c in e.continuations]
    if e.target_ids is not None:
        return [e.prompt_ids + e.target_ids]
    return [e.prompt_ids]


def collate(
    encoded: Sequence[Encoded], indices: Sequence[int], pad_id: int, padding: str = "right"
) -> Batch:
    """Pad the rows of ``encoded[i] for i in indices`` into one batch."""
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    samples = [encoded[i] for i in indices]
    rows: list[tuple[int, int]] = []
    seqs: list[list[int]] = []
    for s, e in enumerate(samples):
        for j, seq in enumerate(_rows_of(e)):
            rows.append((s, j))
            seqs.append(seq)
    width = max(len(q) for q in seqs)
    left = padding == "left"
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for r, q in enumerate(seqs):
        off = width - len(q) if left else 0
        ids[r, off : off + len(q)] = torch.tensor(q, dtype=torch.long)
        mask[r, off : off + len(q)] = 1
        offsets.append(off)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if left else torch.arange(width).expand_as(ids)

    cmax = max([len(e.option_ids or e.continuations or []) for e in samples] + [1])
    first_row = {}
    for r, (s, _j) in enumerate(rows):
        first_row.setdefault(s, r)
    last, labels, is_free = [], [], []
    opt_flat, opt_token, opt_slot = [], [], []
    tok_flat, tok_target, tok_slot, tok_sample = [], [], [], []
    choice_mask = torch.zeros((len(samples), cmax), dtype=torch.bool)
    for s, e in enumerate(samples):
        r0 = first_row[s]
        base = r0 * width + offsets[r0]
        n_prompt = len(e.prompt_ids)
        if e.prompts is not None:  # multiple input: routed at the gold choice's prompt
            rg = r0 + (e.label or 0)
            last.append(rg * width + offsets[rg] + n_prompt - 1)
        else:
            last.append(base + n_prompt - 1)
        labels.append(-1 if e.label is None else e.label)
        is_free.append(e.target_ids is not None)
        if e.option_ids is not None:
            for c, t in enumerate(e.option_ids):
                opt_flat.append(base + n_prompt - 1)
                opt_token.append(t)
                opt_slot.append(s * cmax + c)
            choice_mask[s, : len(e.option_ids)] = True
        elif e.continuations is not None:
            for c, cont in enumerate(e.continuations):
                rb = (r0 + c) * width + offsets[r0 + c]
                for t, tid in enumerate(cont):
                    tok_flat.append(rb + e.prompt_len(c) - 1 + t)
                    tok_target.append(tid)
                    tok_slot.append(s * cmax + c)
                    tok_sample.append(s)
            choice_mask[s, : len(e.continuations)] = True
        else:
            for t, tid in enumerate(e.target_ids or []):
                tok_flat.append(base + n_prompt - 1 + t)
                tok_target.append(tid)
                tok_slot.append(-1)
                tok_sample.append(s)

    def lt(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long)

    return Batch(
        indices=list(indices),
        rows=rows,
        row_lengths=[len(q) for q in seqs],
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions.contiguous(),
        left_padded=left,
        last=lt(last),
        labels=lt(labels),
        is_free=torch.tensor(is_free, dtype=torch.bool),
        cmax=cmax,
        opt_flat=lt(opt_flat),
        opt_token=lt(opt_token),
        opt_slot=lt(opt_slot),
        tok_flat=lt(tok_flat),
        tok_target=lt(tok_target),
        tok_slot=lt(tok_slot),
        tok_sample=lt(tok_sample),
        choice_mask=choice_mask,
    )


def sorted_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Deterministic length-sorted batches of sample indices (for no-grad passes)."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].max_len, i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def row_batches(encoded: Sequence[Encoded], max_rows: int) -> list[list[int]]:
    """Length-sorted sample groups of at most ``max_rows`` padded rows (a sample with more
    choices than that forms a group of its own)."""
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].max_len, i))
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for i in order:
        n = len(_rows_of(encoded[i]))
        if current and rows + n > max_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    if current:
        batches.append(current)
    return batches


def bucket_batches(
    encoded: Sequence[Encoded], batch_size: int, generator: torch.Generator, pool: int = 16
) -> list[list[int]]:
    """Shuffled, length-bucketed training batches.

    Shuffle all samples, sort each pool of ``pool * batch_size`` by length, cut it into
    batches, then shuffle the batch order: little padding, and still random batches.
    """
    perm = torch.randperm(len(encoded), generator=generator).tolist()
    batches: list[list[int]] = []
    span = batch_size * pool
    for start in range(0, len(perm), span):
        chunk = sorted(perm[start : start + span], key=lambda i: encoded[i].max_len)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer below the cached prefix: returns its input."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        # keep attributes some decoders read from their layers (e.g. attention_type)
        for attr in ("attention_type", "layer_type", "layer_idx"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def start_at_layer(tm: TunerModel, states: torch.Tensor) -> Iterator[None]:
    """Within the block, the decoder skips the layers below ``tm.layers[0]`` and feeds
    ``states`` (``[rows, seq, hidden]``) to that layer instead."""
    lo = tm.layers[0]
    decoder = tm.decoder
    real = decoder.layers
    patched = torch.nn.ModuleList(
        [_PassThrough(layer) if i < lo else layer for i, layer in enumerate(real)]
    )

    def feed(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        h = states.to(args[0].device if args else kwargs["hidden_states"].device)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = real[lo].register_forward_pre_hook(feed, with_kwargs=True)
    decoder.layers = patched
    try:
        yield
    finally:
        decoder.layers = real
        handle.remove()


def decoder_hidden(
    tm: TunerModel, batch: Batch, prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """Final hidden states ``[rows, seq, hidden]`` (after the final norm, before the head)."""
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    if prefix is None:
        return tm.decoder(**kwargs).last_hidden_state
    with start_at_layer(tm, prefix):
        return tm.decoder(**kwargs).last_hidden_state


@dataclass
class HeadScores:
    """What the LM head yields at a batch's scored positions (on the head's device)."""

    choice_scores: torch.Tensor  # [S, cmax] float32, -inf where a sample has no such choice
    token_logprobs: torch.Tensor  # [P] log-prob of each full-vocab target token
    token_hit: torch.Tensor  # [P] bool, the target is the argmax
    token_top2: torch.return_types.topk  # [P, <=2] best two log-probs and their token ids
    option_logz: torch.Tensor | None = None  # [S] log-normaliser at the last prompt token


def head_scores(
    tm: TunerModel, hidden: torch.Tensor, batch: Batch, normalise: bool = False
) -> HeadScores:
    """Scores at the scored positions from final hidden states.

    Single-token options get their raw logits (the softmax normaliser is the same for every
    option of a sample, so choices and margins do not need it); ``normalise`` also computes
    that normaliser, to report log-probabilities. Computed on the device of ``hidden`` (the
    LM head's, with a device map).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    dev = flat.device
    head = tm.lm_head
    bias = getattr(head, "bias", None)
    scores = torch.full((batch.size * batch.cmax,), float("-inf"), device=dev, dtype=torch.float32)
    logz = None
    if batch.opt_flat.numel():
        opt_token = batch.opt_token.to(head.weight.device)
        h = flat.index_select(0, batch.opt_flat.to(dev)).float()
        w = head.weight.index_select(0, opt_token).to(dev).float()
        logit = (h * w).sum(-1)
        if bias is not None:
            logit = logit + bias.index_select(0, opt_token).to(dev).float()
        scores = scores.index_put((batch.opt_slot.to(dev),), logit)
    if normalise:
        last = flat.index_select(0, batch.last.to(dev))
        logz = torch.logsumexp(head(last).float().to(dev), dim=-1)
    token_logprobs = torch.zeros(0, device=dev)
    token_hit = torch.zeros(0, dtype=torch.bool, device=dev)
    top2 = torch.zeros((0, 2), device=dev).topk(2, dim=-1)
    if batch.tok_flat.numel():
        tok_target, tok_slot = batch.tok_target.to(dev), batch.tok_slot.to(dev)
        logits = head(flat.index_select(0, batch.tok_flat.to(dev))).float().to(dev)
        logprobs = torch.log_softmax(logits, dim=-1)
        token_logprobs = logprobs.gather(1, tok_target[:, None])[:, 0]
        token_hit = logits.argmax(-1) == tok_target
        top2 = logprobs.topk(min(2, logprobs.shape[-1]), dim=-1)
        mc = tok_slot >= 0
        if mc.any():
            sums = torch.zeros_like(scores).index_add(0, tok_slot[mc], token_logprobs[mc])
            has = torch.zeros_like(scores, dtype=torch.bool)
            has[tok_slot[mc]] = True
            scores = torch.where(has, sums, scores)
    return HeadScores(scores.view(batch.size, batch.cmax), token_logprobs, token_hit, top2, logz)


def forward(
    tm: TunerModel,
    batch: Batch,
    capture: RoutingCapture,
    prefix: torch.Tensor | None = None,
) -> Outputs:
    """One forward pass: scores at the scored positions and the routing vectors.

    Gradient flows to the tuned routers when called with grad enabled. The outputs are on
    the batch's device (with a device map the head and routers may sit elsewhere; their
    small outputs are gathered here, so the loss is computed on one device).
    """
    capture.positions = batch.last
    hidden = decoder_hidden(tm, batch, prefix)
    head = head_scores(tm, hidden, batch)
    dev = batch.last.device
    return Outputs(
        head.choice_scores.to(dev),
        head.token_logprobs.to(dev),
        head.token_hit.to(dev),
        capture.vectors(dev),
    )
