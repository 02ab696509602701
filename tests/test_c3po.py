"""bench.c3po: the every-prompt-token positions, its reference routing and its
kernel-regression step, each against an independent computation (the positions counted
by hand, the snapshot's routing and the transplant diagnostic's rescoring)."""

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
    return tm, encoded


def test_positions_last_and_all(setup: tuple) -> None:
    tm, encoded = setup
    batch = collate(encoded, list(range(len(encoded))), tm.tokenizer.pad_token_id)
    width = batch.input_ids.shape[1]
    last, _ = prompt_positions(batch, encoded, "last")  # checked in tests/test_transplant.py
    every, every_owner = prompt_positions(batch, encoded, "all")
    expected = [
        r * width + t
        for r, (s, j) in enumerate(batch.rows)
        for t in range(encoded[batch.indices[s]].prompt_len(j))
    ]
    assert every.tolist() == expected
    assert set(last.tolist()) <= set(every.tolist())
    with pytest.raises(ValueError, match="scope: 'last' or 'all', got 'first'"):
        prompt_positions(batch, encoded, "first")
    assert torch.equal(torch.bincount(every_owner), torch.tensor(
        [sum(e.prompt_len(j) for j in range(len(e.continuations or [0]))) for e in encoded]
    ))  # fmt: skip


def test_last_token_reference_routing_is_the_snapshots(setup: tuple) -> None:
    tm, encoded = setup
    ours = reference_routing(tm, encoded, "last", batch_size=5)
    snap = take_snapshot(tm, encoded, batch_size=7)
    torch.testing.assert_close(ours, snap.routing, atol=1e-6, rtol=1e-5)
    every = reference_routing(tm, encoded, "all", batch_size=5)
    layers = every.view(len(encoded), len(tm.layers), tm.num_experts).sum(-1)
    torch.testing.assert_close(layers, torch.ones_like(layers))  # a distribution per layer
    assert not torch.allclose(every, ours)


def test_kernel_mix_scores_as_the_transplant_does(setup: tuple) -> None:
    """Zero steps at the last token: the test samples routed by the kernel-weighted mix of
    their neighbours, scored like ``transplant.rescore`` with the same targets."""
    tm, encoded = setup
    ref: list[Encoded] = encoded[:16]
    test = encoded[16:]
    routing = reference_routing(tm, ref, "last", batch_size=8)
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(ref), size=(len(test), 3))
    index[0] = -1  # no neighbour: routed as the model routes it
    index[1, 2] = -1
    weight = rng.random((len(test), 3)).astype(np.float32) * (index >= 0)
    weight /= np.maximum(weight.sum(1, keepdims=True), 1e-9)
    got = c3po_correct(tm, ref, routing, test, index, weight, "last", steps=0, lr=0.1, batch_size=3)
    targets = torch.stack([
        (torch.as_tensor(weight[i])[:, None] * routing[index[i].clip(min=0)]).sum(0)
        if (index[i] >= 0).any() else reference_routing(tm, [test[i]], "last", 1)[0]
        for i in range(len(test))
    ])  # fmt: skip
    expected, _ = rescore(tm, test, list(range(len(test))), targets)
    assert torch.equal(got["mix"], expected)
    assert torch.equal(got["c3po"], expected)  # no steps: nothing moves
