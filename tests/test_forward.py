"""Batched forward: the scored position is the real last token, logits only where scored,
and the prefix cache reproduces the full forward."""

from __future__ import annotations

import pytest
import torch
from tuner_fixtures import tiny_dir  # noqa: F401

from tuner.data.prompts import encode
from tuner.data.sources import Example
from tuner.model.choice_loss import score
from tuner.model.forward import collate, forward
from tuner.model.frozen_cache import PrefixCache
from tuner.model.load import load_model
from tuner.model.routing import RoutingCapture

EXAMPLES = [
    Example("the cat is", ("red", "green", "blue"), 0, None, "a", "f:1"),
    Example(
        "which word is a fruit like apple or pear or grape", ("apple", "dog"), 1, None, "b", "f:2"
    ),
    Example("a dog", ("blue cat", "the large river stone", "sun"), 2, None, "c", "f:3"),
    Example("the sun is", None, None, " red and blue", "d", "f:4"),
]


@pytest.fixture(scope="module")
def tm(tiny_dir):  # noqa: F811
    return load_model(str(tiny_dir), layers="2,3", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def encoded(tm):
    return {s: encode(EXAMPLES, tm.tokenizer, s) for s in ("letter", "loglik")}


def _run(tm, enc, idx, padding="right", prefix=None):
    batch = collate(enc, idx, tm.tokenizer.pad_token_id, padding)
    with torch.no_grad(), RoutingCapture(tm) as cap:
        out = forward(tm, batch, cap, prefix(batch) if prefix else None)
    return batch, out, score(out, batch)


@pytest.mark.parametrize("scoring", ["letter", "loglik"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_scored_position_is_real_last_token(tm, encoded, scoring, padding):
    enc = encoded[scoring]
    assert len({e.max_len for e in enc}) > 1  # rows really differ in length
    batch, out, scored = _run(tm, enc, [0, 1, 2, 3], padding)
    if scoring == "loglik":
        assert enc[2].continuations is not None  # a multi-token sample is in the batch
    for s in range(4):
        _, alone, alone_scored = _run(tm, enc, [s])
        n = alone.choice_scores.shape[1]
        torch.testing.assert_close(
            out.choice_scores[s, :n], alone.choice_scores[0], atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(out.routing[s], alone.routing[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scored.loss[s], alone_scored.loss[0], atol=1e-4, rtol=1e-4)
        assert scored.correct[s] == alone_scored.correct[0]
        # the routing vector is one softmax per tuned layer
        torch.testing.assert_close(alone.routing[0].view(2, -1).sum(-1), torch.ones(2))


def test_routing_is_read_at_the_last_prompt_token_not_the_last_position(tm, encoded):
    # the free-form sample (3) has completion tokens after its prompt: routing must stay at
    # the prompt's last token, which equals running the prompt alone
    enc = encoded["letter"]
    _, with_target, _ = _run(tm, enc, [3])
    prompt_only = [type(enc[3])(enc[3].prompt_ids, [5, 6], None, None, 0)]
    _, alone, _ = _run(tm, prompt_only, [0])
    torch.testing.assert_close(with_target.routing, alone.routing, atol=1e-5, rtol=1e-5)


def test_head_only_at_scored_positions(tm, encoded):
    seen = []
    handle = tm.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        batch, _, _ = _run(tm, encoded["loglik"], [0, 1, 2, 3])
    finally:
        handle.remove()
    # single-token choices never call the head; the rest call it on [positions, hidden] only
    assert seen == [(batch.tok_flat.numel(), tm.model.config.hidden_size)]
    _run(tm, encoded["letter"], [0, 1, 2])  # letter-only batch
    assert len(seen) == 1


def test_prefix_cache_reproduces_full_forward(tm, encoded, tmp_path):
    enc = encoded["loglik"]
    cache = PrefixCache.build(tm, enc, 2, tmp_path / "prefix.bin", tm.tokenizer.pad_token_id)
    reopened = PrefixCache.open(tmp_path / "prefix.bin")
    assert reopened is not None and reopened.offsets == cache.offsets
    for padding in ("right", "left"):
        _, full, _ = _run(tm, enc, [3, 0, 2, 1], padding)
        _, cached, _ = _run(tm, enc, [3, 0, 2, 1], padding, prefix=reopened.states)
        torch.testing.assert_close(cached.choice_scores, full.choice_scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cached.token_logprobs, full.token_logprobs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cached.routing, full.routing, atol=1e-5, rtol=1e-5)
    # the decoder's layers are restored afterwards
    assert all(type(layer).__name__ == "OlmoeDecoderLayer" for layer in tm.decoder.layers)


def test_prefix_cache_skips_the_frozen_layers(tm, encoded, tmp_path):
    enc = encoded["letter"]
    cache = PrefixCache.build(tm, enc, 4, tmp_path / "p.bin", tm.tokenizer.pad_token_id)
    calls = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i, layer in enumerate(tm.decoder.layers)
    ]
    try:
        _run(tm, enc, [0, 1], prefix=cache.states)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [2, 3]


def test_scores_match_the_full_model_logits(tm, encoded):
    """Choice scores equal lm-eval style sums of log-probs from the model's own full logits."""
    for scoring in ("letter", "loglik"):
        enc = encoded[scoring]
        _, out, scored = _run(tm, enc, [0, 1, 2, 3])
        for s, e in enumerate(enc):
            rows = (
                [e.prompt_ids + c for c in e.continuations]
                if e.continuations
                else [e.prompt_ids + (e.target_ids or [])]
            )
            logps = []
            for row in rows:
                with torch.no_grad():
                    logits = tm.model(input_ids=torch.tensor([row])).logits[0].float()
                logps.append(torch.log_softmax(logits, -1))
            n = len(e.prompt_ids)
            if e.option_ids is not None:  # restricted to the options: CE-equivalent logits
                full = logps[0][n - 1, e.option_ids]
                got = out.choice_scores[s, : len(e.option_ids)]
                torch.testing.assert_close(
                    torch.log_softmax(got, -1), torch.log_softmax(full, -1), atol=1e-4, rtol=1e-4
                )
            elif e.continuations is not None:
                sums = torch.stack(
                    [
                        lp[n - 1 + torch.arange(len(c)), torch.tensor(c)].sum()
                        for lp, c in zip(logps, e.continuations, strict=True)
                    ]
                )
                torch.testing.assert_close(
                    out.choice_scores[s, : len(sums)], sums, atol=1e-4, rtol=1e-4
                )
            else:  # free-form: mean NLL, correct iff greedy reproduces the completion
                t = torch.tensor(e.target_ids)
                pos = n - 1 + torch.arange(len(t))
                torch.testing.assert_close(
                    scored.loss[s], -logps[0][pos, t].mean(), atol=1e-4, rtol=1e-4
                )
                assert bool(scored.correct[s]) == bool((logps[0][pos].argmax(-1) == t).all())
