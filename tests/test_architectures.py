"""The router table: what is a router (and what merely has "gate" in its name)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import ALL_ARCHITECTURES

from roma_vllm.architectures import (
    GENERIC,
    ROUTERS,
    UnsupportedModelError,
    architecture_of,
    find_routers,
    num_experts,
    router_layers,
    router_spec,
    supported_architectures,
)


def test_table_covers_the_documented_architectures() -> None:
    assert supported_architectures() == sorted(ALL_ARCHITECTURES)
    assert router_spec("SomethingNewForCausalLM") is GENERIC
    assert ROUTERS["GptOssForCausalLM"].has_bias


@pytest.mark.parametrize(
    ("arch", "name", "layer"),
    [
        ("OlmoeForCausalLM", "model.layers.3.mlp.gate.weight", 3),
        ("Qwen3MoeForCausalLM", "model.layers.47.mlp.gate.weight", 47),
        ("DeepseekV3ForCausalLM", "model.layers.60.mlp.gate.weight", 60),
        ("MixtralForCausalLM", "model.layers.1.block_sparse_moe.gate.weight", 1),
        ("GptOssForCausalLM", "model.layers.2.mlp.router.weight", 2),
        ("GptOssForCausalLM", "model.layers.2.mlp.router.bias", 2),
    ],
)
def test_router_names_match(arch: str, name: str, layer: int) -> None:
    assert router_spec(arch).match(name) == layer


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("Qwen2MoeForCausalLM", "model.layers.0.mlp.shared_expert_gate.weight"),
        ("Qwen2MoeForCausalLM", "model.layers.0.mlp.shared_expert.gate_proj.weight"),
        ("OlmoeForCausalLM", "model.layers.0.mlp.experts.3.gate_proj.weight"),
        ("DeepseekV3ForCausalLM", "model.layers.3.mlp.gate.e_score_correction_bias"),
        ("MixtralForCausalLM", "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
        ("MixtralForCausalLM", "model.layers.0.mlp.gate.weight"),  # in-memory name, not ckpt
        ("OlmoeForCausalLM", "model.layers.0.mlp.gate.bias"),
        ("GptOssForCausalLM", "model.layers.0.mlp.experts.gate_up_proj"),
    ],
)
def test_names_that_are_not_routers(arch: str, name: str) -> None:
    assert router_spec(arch).match(name) is None


def test_find_routers_in_tiny_checkpoints(tiny_model: Any) -> None:
    from roma_vllm.checkpoint import checkpoint_shapes, load_config

    expected_layers = {
        "DeepseekV2ForCausalLM": [1, 2, 3],  # first_k_dense_replace=1: layer 0 is dense
        "DeepseekV3ForCausalLM": [1, 2, 3],
    }
    for arch in ALL_ARCHITECTURES:
        model = tiny_model(arch)
        config = load_config(model)
        assert architecture_of(config) == arch
        assert num_experts(config) == 8
        shapes = checkpoint_shapes(model)
        routers = find_routers(arch, shapes, num_experts(config))
        assert router_layers(routers) == expected_layers.get(arch, [0, 1, 2, 3]), arch
        for name in routers:
            assert shapes[name][0] == 8, name  # [E, H] weight or [E] bias
        assert not any("shared_expert_gate" in n or "gate_proj" in n for n in routers)
        per_layer = 2 if arch == "GptOssForCausalLM" else 1  # weight + bias
        assert len(routers) == per_layer * len(router_layers(routers))


def test_generic_fallback_requires_the_expert_count() -> None:
    shapes = {
        "model.layers.0.mlp.gate.weight": (16, 64),
        "model.layers.1.mlp.gate.weight": (4, 64),  # not [experts, hidden]: skipped
        "model.layers.1.mlp.gate_proj.weight": (128, 64),
    }
    assert find_routers("NewMoeForCausalLM", shapes, 16) == {"model.layers.0.mlp.gate.weight": 0}
    with pytest.raises(UnsupportedModelError, match=re.escape("no MoE routers found")):
        find_routers("NewMoeForCausalLM", shapes, None)


def test_num_experts_reads_every_spelling_and_text_config() -> None:
    assert num_experts({"num_experts": 64}) == 64
    assert num_experts({"num_local_experts": 8}) == 8
    assert num_experts({"n_routed_experts": 256}) == 256
    assert num_experts({"text_config": {"num_experts": 128}}) == 128
    assert num_experts({"hidden_size": 4}) is None


def test_architecture_of_without_architectures() -> None:
    with pytest.raises(UnsupportedModelError, match="no 'architectures' entry"):
        architecture_of({"model_type": "olmoe"})


def test_num_experts_reads_ernie_and_dbrx_spellings() -> None:
    assert num_experts({"moe_num_experts": 64}) == 64  # ERNIE 4.5
    assert num_experts({"ffn_config": {"moe_num_experts": 16}}) == 16  # DBRX
    assert num_experts({"num_experts": True}) is None  # a flag, not a count


def test_discovery_agrees_with_the_table_on_the_tiny_checkpoints(tiny_model: Any) -> None:
    """Routers found from the model (meta-device build) == the exact name patterns kept for
    the original architectures: shared-expert gates and correction biases left out."""
    from roma_vllm.checkpoint import checkpoint_shapes, load_config

    for arch in ALL_ARCHITECTURES:
        model = tiny_model(arch)
        config = load_config(model)
        shapes = checkpoint_shapes(model)
        by_name = find_routers(arch, shapes, num_experts(config))
        assert find_routers(arch, shapes, num_experts(config), config=config) == by_name, arch
    v3 = checkpoint_shapes(tiny_model("DeepseekV3ForCausalLM"))
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in v3  # carried, never tuned


def test_names_map_both_ways_through_transformers_conversion() -> None:
    from roma_vllm.discovery import discovered
    from roma_vllm.hf import checkpoint_to_memory, memory_to_checkpoint
    from roma_vllm.testing.matrix import row_by_architecture, row_config

    # Phi-3.5-MoE: transformers 5 keeps the router at mlp.router in memory
    config = row_config(row_by_architecture("PhiMoEForCausalLM"))
    routers, model = discovered(config)
    weight = routers[0].weight
    assert weight == "model.layers.0.mlp.router.weight"
    saved = memory_to_checkpoint(model, [weight])[weight]
    assert saved == "model.layers.0.block_sparse_moe.gate.weight"
    assert checkpoint_to_memory(model, [saved]) == {saved: weight}
    # no such tensor: None, not a guess
    assert checkpoint_to_memory(model, ["model.layers.0.nothing.weight"]) == {
        "model.layers.0.nothing.weight": None
    }


def test_discovered_router_missing_from_the_checkpoint(tiny_model: Any) -> None:
    from roma_vllm.checkpoint import checkpoint_shapes, load_config

    model = tiny_model("MixtralForCausalLM")
    config = load_config(model)
    shapes = {
        n.replace("gate.weight", "gating.weight"): s for n, s in checkpoint_shapes(model).items()
    }
    with pytest.raises(
        UnsupportedModelError,
        match=re.escape(
            "no MoE routers found for architecture 'MixtralForCausalLM': the model's routers "
            "(e.g. model.layers.0.mlp.gate.weight, saved as "
            "model.layers.0.block_sparse_moe.gate.weight) are not in the checkpoint"
        ),
    ):
        find_routers("MixtralForCausalLM", shapes, 8, config=config)
