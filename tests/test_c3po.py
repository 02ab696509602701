"""bench.c3po: the every-prompt-token positions, its reference routing, its kernel mix and its
neighbourhood-gradient steps, each against an independent computation (positions read off
the attention mask, routing from transformers' own router logits, the mix written out, the
neighbours' loss from the transplant diagnostic's rescoring)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tuner_fixtures import mc_rows, tiny_dir  # noqa: F401

from bench.c3po import c3po_correct, reference_routing
from tuner.data.prompts import Encoded, encode
from tuner.data.sources import load_examples
from tuner.diagnose.transplant import prompt_positions, rescore
from tuner.model.forward import collate
from tuner.model.load import load_model
from tuner.roma.snapshot import take_snapshot


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):  # noqa: F811
    from tuner_fixtures import write_jsonl

    rows = mc_rows(24, seed=5)
    for r in rows[::2]:  # multi-token choices: one row per choice under loglik
        r["choices"] = [f"{c} or the {c}" for c in r["choices"]]
    path = write_jsonl(tmp_path_factory.mktemp("c3po") / "rows.jsonl", rows)
    tm = load_model(str(tiny_dir), dtype="float32", device="cpu", train_routers=False)
    encoded = encode(load_examples(str(path)).examples, tm.tokenizer, "loglik")
    assert any(e.continuations and max(map(len, e.continuations)) > 1 for e in encoded)
    return tm, encoded


def _prompt_positions_from_mask(batch, encoded: list[Encoded]) -> list[list[int]]:
    """Per batch row, the flat indices of its prompt tokens, read off the attention mask:
    the row's real tokens are where the mask is 1, and the prompt is all of them but the
    trailing continuation (whose length the example gives)."""
    width = batch.input_ids.shape[1]
    out = []
    for r, (s, j) in enumerate(batch.rows):
        e = encoded[batch.indices[s]]
        real = batch.attention_mask[r].nonzero().flatten().tolist()
        n_cont = len(e.continuations[j]) if e.continuations else 0
        prompt = real[: len(real) - n_cont]
        # the ids found there are the prompt's own ids
        assert batch.input_ids[r, prompt].tolist() == e.prompt_ids
        out.append([r * width + t for t in prompt])
    return out


@pytest.mark.parametrize("padding", ["right", "left"])
def test_positions_last_and_all(setup: tuple, padding: str) -> None:
    tm, encoded = setup
    batch = collate(encoded, list(range(len(encoded))), tm.tokenizer.pad_token_id, padding)
    # the batch really is padded on that side somewhere
    col = 0 if padding == "left" else -1
    assert (batch.attention_mask[:, col] == 0).any()
    rows = _prompt_positions_from_mask(batch, encoded)
    every, every_owner = prompt_positions(batch, encoded, "all")
    last, last_owner = prompt_positions(batch, encoded, "last")
    assert every.tolist() == [p for row in rows for p in row]
    assert last.tolist() == [row[-1] for row in rows]
    owners = [s for r, (s, _j) in enumerate(batch.rows) for _ in rows[r]]
    assert every_owner.tolist() == owners
    assert last_owner.tolist() == [s for s, _j in batch.rows]
    with pytest.raises(ValueError, match="scope: 'last' or 'all', got 'first'"):
        prompt_positions(batch, encoded, "first")


def _hf_routing(tm, e: Encoded) -> torch.Tensor:
    """``[prompt tokens, layers * experts]``: transformers' own router logits of the prompt
    alone (causal attention: the continuation cannot change the prompt's routing), softmaxed
    per layer."""
    ids = torch.tensor([e.prompt_ids])
    with torch.no_grad():
        out = tm.model(input_ids=ids, output_router_logits=True)
    logits = [out.router_logits[layer].reshape(len(e.prompt_ids), -1) for layer in tm.layers]
    return torch.cat([torch.softmax(x.float(), -1) for x in logits], -1)


def test_reference_routing_last_and_all_tokens(setup: tuple) -> None:
    tm, encoded = setup
    encoded = encoded[:8]  # single- and multi-token choices
    ours_last = reference_routing(tm, encoded, "last", batch_size=3)
    ours_all = reference_routing(tm, encoded, "all", batch_size=3)
    hf = [_hf_routing(tm, e) for e in encoded]
    torch.testing.assert_close(ours_last, torch.stack([h[-1] for h in hf]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_all, torch.stack([h.mean(0) for h in hf]), atol=1e-5, rtol=1e-4)
    # and the snapshot's routing vectors are the last-token routing too
    snap = take_snapshot(tm, encoded, batch_size=5)
    torch.testing.assert_close(ours_last, snap.routing, atol=1e-6, rtol=1e-5)


def _neighbours(n_ref: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    index = rng.integers(0, n_ref, size=(n_test, 3))
    index[0] = -1  # no neighbour: routed as the model routes it
    index[1, 2] = -1
    weight = rng.random((n_test, 3)).astype(np.float32) * (index >= 0)
    weight /= np.maximum(weight.sum(1, keepdims=True), 1e-9)
    return index, weight


def _kernel_mix(index: np.ndarray, weight: np.ndarray, routing: torch.Tensor) -> torch.Tensor:
    """``sum_j w_ij * routing[n_ij]`` per test sample, written out term by term."""
    out = torch.zeros(len(index), routing.shape[1], dtype=torch.float64)
    for i in range(len(index)):
        for j in range(index.shape[1]):
            if index[i, j] >= 0:
                out[i] += float(weight[i, j]) * routing[index[i, j]].double()
    return out.float()


def test_kernel_mix_scores_as_the_transplant_does(setup: tuple) -> None:
    """Zero steps at the last token: the test samples routed by the kernel-weighted mix of
    their neighbours, scored like ``transplant.rescore`` with the same targets."""
    tm, encoded = setup
    ref: list[Encoded] = encoded[:16]
    test = encoded[16:]
    routing = reference_routing(tm, ref, "last", batch_size=8)
    index, weight = _neighbours(len(ref), len(test))
    got = c3po_correct(tm, ref, routing, test, index, weight, "last", steps=0, lr=0.1, batch_size=3)
    own = torch.stack([_hf_routing(tm, e)[-1] for e in test])
    targets = _kernel_mix(index, weight, routing)
    targets[0] = own[0]  # no neighbours: its own routing
    torch.testing.assert_close(got["routing"], targets, atol=1e-5, rtol=1e-4)
    expected, _ = rescore(tm, test, list(range(len(test))), got["routing"])
    assert torch.equal(got["mix"], expected)
    assert torch.equal(got["c3po"], expected)  # no steps: nothing moves


def _neighbour_loss(tm, ref: list[Encoded], index, weight, i: int, target: torch.Tensor) -> float:
    """Test sample ``i``'s neighbours' kernel-weighted cross-entropy over their choices, each
    neighbour scored with ``target`` at its last prompt token."""
    total = 0.0
    for j, n in enumerate(index[i]):
        if n < 0:
            continue
        _, (s,) = rescore(tm, ref, [int(n)], target[None])  # one at a time: n may repeat
        ce = float(torch.logsumexp(s.double(), 0) - s[ref[n].label].double())
        total += float(weight[i, j]) * ce
    return total


def test_gradient_steps_lower_the_neighbours_loss(setup: tuple) -> None:
    """With steps, each sample's routing moves from the kernel mix to one with a lower loss
    on its neighbours (the quantity the steps descend); a sample without neighbours keeps
    its own routing; and ``c3po`` is the correctness under the routing returned."""
    tm, encoded = setup
    ref: list[Encoded] = encoded[:16]
    test = encoded[16:20]
    routing = reference_routing(tm, ref, "last", batch_size=8)
    index, weight = _neighbours(len(ref), len(test))
    mix = _kernel_mix(index, weight, routing)
    got = c3po_correct(
        tm, ref, routing, test, index, weight, "last", steps=2, lr=0.05, batch_size=4
    )
    moved = got["routing"]
    torch.testing.assert_close(moved[0], _hf_routing(tm, test[0])[-1], atol=1e-5, rtol=1e-4)
    layers = moved.view(len(test), len(tm.layers), tm.num_experts).sum(-1)
    torch.testing.assert_close(layers, torch.ones_like(layers))  # a distribution per layer
    for i in range(1, len(test)):
        assert (moved[i] - mix[i]).abs().max() > 1e-3, i  # the steps moved it
        before = _neighbour_loss(tm, ref, index, weight, i, mix[i])
        after = _neighbour_loss(tm, ref, index, weight, i, moved[i])
        assert after < before, (i, before, after)
    expected, _ = rescore(tm, test, list(range(len(test))), moved)
    assert torch.equal(got["c3po"], expected)
