"""`--router-grad dense`: the forward stays top-k, bit for bit; the router gradients are those
of the mixture of all experts weighted by the router's full distribution, checked against a
hand-written dense forward of every tuned MoE layer (experts computed one by one from their
weights), on a tiny model of every supported architecture; and one `roma-tune run` with it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_ARCHITECTURES
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from roma_vllm.deltas import read_deltas
from tuner.cli.app import app
from tuner.config import ConfigError, TuneConfig
from tuner.model.dense_grad import DenseRouterGrad, experts_of
from tuner.model.load import TunerModel, load_model


def _load(tiny_model, arch: str) -> TunerModel:
    # the last two MoE layers: the lower one also gets gradient through the upper's dense path
    return load_model(str(tiny_model(arch)), layers="last2", dtype="float32", device="cpu")


def _tokens() -> torch.Tensor:
    return torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(5))


def _loss_and_grads(tm: TunerModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Next-token cross-entropy of the full model; its gradient on every tuned router tensor."""
    for p in tm.parameters():
        p.grad = None
    logits = tm.model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), [p.grad.clone() for p in tm.parameters()]


def _expert(experts: torch.nn.Module, e: int, x: torch.Tensor, arch: str) -> torch.Tensor:
    """Expert ``e`` on tokens ``x``, written out from its weights."""
    if arch == "GptOssForCausalLM":  # [E, H, 2I] interleaved gate/up, biases, clamped GLU
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        h = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        return h @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def _hand_dense(tm: TunerModel, layer: int) -> tuple[torch.nn.Module, object]:
    """A replacement for the experts' forward of ``layer``: value of the model's own top-k
    output, gradient of ``c * sum_e p_e expert_e(x)`` with ``p`` from the router weight."""
    arch, config = tm.architecture, tm.model.config
    experts = experts_of(tm, layer)
    router = tm.router_modules[layer]
    topk_forward = experts.forward
    scale = config.routed_scaling_factor if arch.startswith("Deepseek") else 1.0

    def forward(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden.float(), router.weight, getattr(router, "bias", None))
        if arch == "DeepseekV3ForCausalLM":  # sigmoid scores, normalised to sum 1
            p = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
        else:
            p = torch.softmax(logits, dim=-1)
        dense = sum(
            scale * p[:, e, None] * _expert(experts, e, hidden, arch)
            for e in range(logits.shape[-1])
        )
        return topk_forward(hidden, index, weights).detach() + (dense - dense.detach())

    return experts, forward


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_dense_gradient_matches_hand_written_dense_mixture(tiny_model, arch):
    tm = _load(tiny_model, arch)
    if arch != "GptOssForCausalLM":
        assert tm.model.config.hidden_act == "silu"  # what _expert writes out
    ids = _tokens()
    topk_logits, topk_grads = _loss_and_grads(tm, ids)
    with DenseRouterGrad(tm):
        dense_logits, dense_grads = _loss_and_grads(tm, ids)
        with torch.no_grad():  # evaluation inside the context stays plain top-k
            assert torch.equal(tm.model(input_ids=ids, use_cache=False).logits, topk_logits)
    # (a) the forward is the top-k model's, exactly
    assert torch.equal(dense_logits, topk_logits)
    # after the context the model is plain again
    assert all(
        torch.equal(a, b) for a, b in zip(_loss_and_grads(tm, ids)[1], topk_grads, strict=True)
    )

    # (b) the independent dense computation
    patched = [_hand_dense(tm, layer) for layer in tm.layers]
    for experts, forward in patched:
        experts.forward = forward
    try:
        hand_logits, hand_grads = _loss_and_grads(tm, ids)
    finally:
        for experts, _ in patched:
            del experts.forward
    assert torch.equal(hand_logits, topk_logits)
    assert len(dense_grads) == len(tm.tuned) >= 2
    for name, dense, hand in zip(sorted(tm.tuned), dense_grads, hand_grads, strict=True):
        assert hand.abs().max() > 0, name
        torch.testing.assert_close(dense, hand, rtol=1e-5, atol=1e-5, msg=name)

    # (c) and it is not the top-k gradient
    for name, dense, topk in zip(sorted(tm.tuned), dense_grads, topk_grads, strict=True):
        assert not torch.allclose(dense, topk, rtol=1e-2, atol=1e-4), name


def test_router_grad_option_is_checked():
    with pytest.raises(ConfigError, match=r"--router-grad: must be one of topk, dense, got 'all'"):
        TuneConfig(router_grad="all")
    assert TuneConfig().router_grad == "topk"
    assert TuneConfig(router_grad="dense").hash() != TuneConfig().hash()


def test_run_with_dense_router_grad_writes_deltas(tiny_dir, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "train.jsonl", mc_rows(16, seed=3))
    out = tmp_path / "run"
    args = ["run", "--no-progress", "--model", str(tiny_dir), "--data", str(data)]
    args += ["--out", str(out), "--epochs", "1", "--batch-size", "8", "--lr", "3e-2"]
    args += ["--layers", "last2", "--dtype", "float32", "--warmup", "0", "--lambda", "0.5"]
    result = CliRunner().invoke(app, [*args, "--router-grad", "dense"])
    assert result.exit_code == 0, result.output
    deltas = read_deltas(out)
    assert deltas.training["config"]["router_grad"] == "dense"
    assert json.loads((out / "config.json").read_text())["config"]["router_grad"] == "dense"
    assert deltas.layers == [2, 3]
    assert deltas.max_abs() > 0
