"""Set-up: the benchmark model (a random OLMoE large enough that compute dominates), the
handmade deltas that re-route every token, and the engine settings both variants share."""

from __future__ import annotations

import math
from pathlib import Path

from bench.common import RESULTS as RESULTS_DIR

RESULTS = RESULTS_DIR / "serving.json"
MODEL_CONFIG = dict(
    hidden_size=512,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=2,
)
QUICK_CONFIG = dict(MODEL_CONFIG, num_hidden_layers=2, num_experts=8)
DTYPE = "bfloat16"
ENGINE = dict(dtype=DTYPE, enforce_eager=True, max_model_len=512, seed=0)


def engine_kwargs(variant: dict) -> dict:
    """``LLM(...)`` keyword arguments of a variant (``{"deltas": path}`` for roma)."""
    kwargs = dict(ENGINE, distributed_executor_backend="uni")
    if variant.get("deltas"):
        kwargs.update(
            load_format="roma", model_loader_extra_config={"roma_deltas": variant["deltas"]}
        )
    return kwargs


def build(folder: Path, config: dict) -> tuple[Path, str, int]:
    """Write the model and its deltas under ``folder``: (model dir, deltas file, parameters)."""
    import torch

    from roma_vllm.checkpoint import checkpoint_shapes
    from roma_vllm.testing.helpers import write_handmade_deltas
    from roma_vllm.testing.tiny import build_tiny_model

    model = build_tiny_model(folder / "model", "OlmoeForCausalLM", dtype=torch.bfloat16, **config)
    deltas = str(write_handmade_deltas(model, folder / "deltas.safetensors"))
    n_params = sum(math.prod(s) for s in checkpoint_shapes(model).values())
    return model, deltas, n_params
