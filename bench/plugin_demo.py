"""Plugin demo: a handmade router delta, served by vLLM with ``--load-format roma``.

``python -m bench.plugin_demo`` builds a tiny random OLMoE checkpoint, writes a delta file
that re-routes every token (each router's rows rolled by one expert), and serves the model
twice with vLLM: as is, and with ``load_format="roma"``. It prints which experts the last
prompt token goes to in every layer, and the greedy continuations, for both. No tuner, no
downloads; a couple of minutes on a CPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = ["the cat is on the", "Question: what is 2 + 3? Answer:", "red green blue"]


def expert_choice(model_dir: Path, deltas: Any, prompt: str) -> dict[str, list[list[int]]]:
    """Top-k experts of the prompt's last token in every layer the deltas change, before and
    after applying them (transformers, float32; loaded and captured by the tuner's code)."""
    import torch

    from roma_vllm.hf import apply_deltas
    from tuner.model.load import load_model
    from tuner.model.routing import RoutingCapture

    layers = ",".join(str(layer) for layer in deltas.layers)
    tm = load_model(str(model_dir), layers, dtype="float32", device="cpu", train_routers=False)
    ids = torch.tensor([tm.tokenizer(prompt)["input_ids"]])
    k = tm.model.config.num_experts_per_tok

    def route() -> list[list[int]]:
        with RoutingCapture(tm) as capture, torch.no_grad():
            capture.positions = torch.tensor([ids.shape[1] - 1])
            tm.model(ids)
            return [sorted(capture.logits[n][0].topk(k).indices.tolist()) for n in tm.layers]

    base = route()
    apply_deltas(tm.model, deltas)
    return {"base": base, "roma": route()}


def generate(model_dir: Path, prompts: list[str], **engine: Any) -> list[str]:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              **engine)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    texts = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    del llm
    cleanup_dist_env_and_memory()
    return texts


def main() -> int:
    # In-process engines: the two start-ups take seconds instead of half a minute each.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from roma_vllm.deltas import read_deltas
    from roma_vllm.testing.helpers import write_handmade_deltas
    from roma_vllm.testing.tiny import build_tiny_model

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="roma-plugin-demo-") as tmp:
        model = build_tiny_model(Path(tmp) / "tiny-olmoe", "OlmoeForCausalLM")
        path = write_handmade_deltas(model, Path(tmp) / "roma_deltas.safetensors")
        deltas = read_deltas(path)
        print(f"\nmodel: {model}\ndeltas: {path} ({len(deltas.tensors)} router tensors, "
              f"layers {deltas.layers}, max |delta| {deltas.max_abs():.3f})")  # fmt: skip
        routing = expert_choice(model, deltas, PROMPTS[0])
        base = generate(model, PROMPTS)
        tuned = generate(model, PROMPTS, load_format="roma",
                         model_loader_extra_config={"roma_deltas": str(path)})  # fmt: skip

    print(f"\nexperts chosen for the last token of {PROMPTS[0]!r}, layer by layer:")
    for layer, (b, r) in enumerate(zip(routing["base"], routing["roma"], strict=True)):
        print(f"  layer {layer}: base {b}  ->  roma {r}")
    print("\ngreedy continuations (vLLM):")
    for prompt, b, r in zip(PROMPTS, base, tuned, strict=True):
        print(f"  {prompt!r}\n    base: {b!r}\n    roma: {r!r}")
    changed = sum(b != r for b, r in zip(base, tuned, strict=True))
    print(f"\n{changed}/{len(PROMPTS)} continuations changed; "
          f"{time.perf_counter() - start:.0f} s in all")  # fmt: skip
    return 0 if changed else 1


if __name__ == "__main__":
    sys.exit(main())
