"""The RoMA objective: formula, lambda, and a few manifold-only steps reduce the manifold term."""

from __future__ import annotations

import pytest
import torch
from tuner_fixtures import tiny_dir  # noqa: F401

from tuner.data.prompts import encode
from tuner.data.sources import Example
from tuner.model.forward import collate, forward
from tuner.model.load import load_model
from tuner.model.routing import RoutingCapture
from tuner.roma.objective import manifold_term, roma_loss


def test_manifold_term_formula():
    r = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    targets = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.0, 0.0]]])
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    # sample 0: 0.25 * 2 + 0.75 * 0; sample 1: 1.0 * 0 + 0 * 0.5
    torch.testing.assert_close(manifold_term(r, targets, w), torch.tensor([0.5, 0.0]))


def test_roma_loss_combines_task_and_lambda():
    task = torch.tensor([1.0, 3.0])
    r = torch.zeros(2, 2, requires_grad=True)
    targets = torch.ones(2, 1, 2)
    w = torch.ones(2, 1)
    terms = roma_loss(task, r, targets, w, lam=0.5)
    assert float(terms.task) == 2.0 and float(terms.manifold) == 2.0
    assert float(terms.total.detach()) == pytest.approx(3.0)
    terms.total.backward()
    torch.testing.assert_close(r.grad, torch.full((2, 2), -0.5))  # 0.5 * mean of 2(r - t)
    zero = roma_loss(task, r.detach(), targets, w, lam=0.0)
    assert float(zero.total) == 2.0


def test_a_few_manifold_only_steps_reduce_it(tiny_dir):  # noqa: F811
    tm = load_model(str(tiny_dir), layers="last2", dtype="float32", device="cpu")
    examples = [
        Example(q, ("red", "green"), 0, None, "t", f"f:{i}")
        for i, q in enumerate(["the cat is", "a dog was", "which word is a fruit", "the sun"])
    ]
    enc = encode(examples, tm.tokenizer, "letter")
    batch = collate(enc, range(4), tm.tokenizer.pad_token_id)
    with torch.no_grad(), RoutingCapture(tm) as cap:
        start = forward(tm, batch, cap).routing
    # align every sample to the next one's initial routing
    targets = start.roll(1, 0)[:, None, :]
    weights = torch.ones(4, 1)
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-2, weight_decay=0.0)
    values = []
    with RoutingCapture(tm) as cap:
        for _ in range(8):
            opt.zero_grad(set_to_none=True)
            out = forward(tm, batch, cap)
            loss = manifold_term(out.routing, targets, weights).mean()
            loss.backward()
            values.append(float(loss.detach()))
            opt.step()
    assert values[-1] < 0.7 * values[0], values
