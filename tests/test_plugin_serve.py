"""``vllm serve --load-format roma`` end to end, with the plugin as installed (entry point).

One server with the default (multi-process) engine answers completions through the
``openai`` client over loopback, and its greedy completion is the tuned model's (computed by
transformers with the deltas applied in memory). With ``VLLM_PLUGINS`` naming another
plugin only, ``--load-format roma`` is refused (an in-process engine is enough for that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from roma_vllm.deltas import read_deltas
from roma_vllm.hf import apply_deltas
from roma_vllm.testing.helpers import VllmServer, write_handmade_deltas

ARCH = "Qwen3MoeForCausalLM"
PROMPT = "the cat is on the"
MAX_TOKENS = 8
SERVE_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256"]


def _hf_tuned_completion(model_dir: Path, deltas: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    apply_deltas(model, read_deltas(deltas))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return tok.decode(ids[0, -MAX_TOKENS:])


@pytest.mark.vllm
def test_vllm_serve_answers_completions_with_tuned_routers(tiny_model: Any, tmp_path: Path) -> None:
    from openai import OpenAI

    model = tiny_model(ARCH)
    deltas = write_handmade_deltas(model, tmp_path / "deltas.safetensors")
    args = [
        *SERVE_ARGS,
        "--load-format", "roma",
        "--model-loader-extra-config", json.dumps({"roma_deltas": str(deltas)}),
    ]  # fmt: skip
    with VllmServer(model, args, log_path=tmp_path / "serve.log") as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        served = client.models.list().data[0].id
        answers = [
            client.completions.create(
                model=served,
                prompt=PROMPT,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            for _ in range(2)
        ]
    log = server.log()
    assert "roma-vllm: merged router deltas" in log  # logged by the worker process
    texts = [a.choices[0].text for a in answers]
    assert texts[0] == texts[1] and texts[0]
    assert answers[0].usage.completion_tokens == MAX_TOKENS
    assert texts[0] == _hf_tuned_completion(model, deltas, PROMPT)


@pytest.mark.vllm
def test_load_format_roma_is_refused_without_the_plugin(
    tiny_model: Any, run_vllm_jobs: Any, tmp_path: Path
) -> None:
    """VLLM_PLUGINS names another plugin only: the entry point is not loaded, roma is unknown.

    (The errors module runs its engines with ``VLLM_PLUGINS=roma``: named, it loads.)
    """
    model = tiny_model(ARCH)
    deltas = write_handmade_deltas(model, tmp_path / "deltas.safetensors")
    job = {
        "model": str(model),
        "load_format": "roma",
        "extra": {"roma_deltas": str(deltas)},
        "prompts": [[5, 6, 7]],
        "max_tokens": 2,
    }
    result = run_vllm_jobs({"excluded": job}, env={"VLLM_PLUGINS": "not_roma"})["excluded"]
    assert not result["ok"], "the engine started without the plugin"
    assert "Load format `roma` is not supported" in result["error"]
