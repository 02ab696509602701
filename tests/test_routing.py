"""Routing vectors come from the current routers, with gradient, at the last prompt token."""

from __future__ import annotations

import pytest
import torch
from tuner_fixtures import tiny_dir  # noqa: F401

from tuner.data.prompts import encode
from tuner.data.sources import Example
from tuner.model.forward import collate, forward
from tuner.model.load import LayersError, load_model, parse_layers
from tuner.model.routing import RoutingCapture
from tuner.roma.objective import manifold_term

EXAMPLES = [
    Example("the cat is", ("red", "green"), 0, None, "a", "f:1"),
    Example(
        "which word is a fruit like apple or pear", ("apple", "dog", "sun"), 1, None, "b", "f:2"
    ),
    Example("a dog", ("blue", "cat"), 1, None, "c", "f:3"),
]


@pytest.fixture(scope="module")
def tm(tiny_dir):  # noqa: F811
    return load_model(str(tiny_dir), layers="2,3", dtype="bfloat16", device="cpu")


def _batch(tm):
    enc = encode(EXAMPLES, tm.tokenizer, "letter")
    return collate(enc, [0, 1, 2], tm.tokenizer.pad_token_id)


def test_only_tuned_routers_are_trainable_and_fp32(tm):
    assert tm.layers == [2, 3]
    assert sorted(tm.tuned) == [f"model.layers.{i}.mlp.gate.weight" for i in (2, 3)]
    trainable = [n for n, p in tm.model.named_parameters() if p.requires_grad]
    assert trainable == [f"model.layers.{i}.mlp.gate.weight" for i in (2, 3)]
    assert all(p.dtype == torch.float32 for p in tm.tuned.values())
    assert tm.decoder.layers[0].mlp.gate.weight.dtype == torch.bfloat16
    # masters hold the checkpoint's exact values
    for name, p in tm.tuned.items():
        torch.testing.assert_close(p.detach(), tm.base[name].float(), rtol=0, atol=0)


@pytest.mark.parametrize("vector", ["probs", "log-probs"])
def test_routing_vector_is_softmax_of_router_logits_at_last_prompt_token(tm, vector):
    norm = torch.softmax if vector == "probs" else torch.log_softmax
    batch = _batch(tm)
    inputs = {}
    hooks = [
        tm.router_modules[i].register_forward_hook(
            lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach())
        )
        for i in tm.layers
    ]
    try:
        with torch.no_grad(), RoutingCapture(tm, vector) as cap:
            out = forward(tm, batch, cap)
    finally:
        for h in hooks:
            h.remove()
    width = batch.input_ids.shape[1]
    for s, e in enumerate(encode(EXAMPLES, tm.tokenizer, "letter")):
        flat = s * width + len(e.prompt_ids) - 1
        expected = torch.cat(
            [norm(inputs[i][flat].float() @ tm.router_modules[i].weight.T, -1) for i in tm.layers]
        )
        torch.testing.assert_close(out.routing[s], expected, atol=1e-5, rtol=1e-5)


def test_manifold_term_alone_reaches_every_tuned_router(tm):
    batch = _batch(tm)
    tm.model.zero_grad(set_to_none=True)
    with RoutingCapture(tm) as cap:
        out = forward(tm, batch, cap)
    targets = torch.full((3, 1, out.routing.shape[1]), 1 / tm.num_experts)
    manifold_term(out.routing, targets, torch.ones(3, 1)).sum().backward()
    for name, p in tm.tuned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in tm.model.named_parameters():
        if name not in {f"model.layers.{i}.mlp.gate.weight" for i in tm.layers}:
            assert p.grad is None, name  # untuned routers and the frozen trunk
    tm.model.zero_grad(set_to_none=True)


def test_unknown_routing_vector_is_a_clear_error(tm):
    with pytest.raises(ValueError, match="routing vector: 'probs' or 'log-probs', got 'logits'"):
        RoutingCapture(tm, "logits")


def test_parse_layers():
    moe = [1, 2, 3, 4, 5, 6, 7]
    assert parse_layers(None, moe) == [3, 4, 5, 6, 7]
    assert parse_layers(None, [0, 1]) == [0, 1]
    assert parse_layers("all", moe) == moe
    assert parse_layers("last2", moe) == [6, 7]
    assert parse_layers("1,3-5", moe) == [1, 3, 4, 5]
    with pytest.raises(
        LayersError,
        match=r"--layers: layer\(s\) \[0, 8\] have no MoE router; MoE layers of this model: 1-7",
    ):
        parse_layers("0,8", moe)
    with pytest.raises(LayersError, match="asks for 9 layers but the model has 7 MoE layers"):
        parse_layers("last9", moe)
