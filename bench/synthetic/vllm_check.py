"""Check that a pretrained synthetic checkpoint loads in vLLM and agrees with transformers.

Greedy-generates one token for some downstream prompts with vLLM (CPU or GPU) and with
transformers, and prints both exact-match accuracies and how often they pick the same token.

    VLLM_CPU_KVCACHE_SPACE=1 python -m bench.synthetic.vllm_check \
        --model bench/models/demo-olmoe --data bench/data/demo/val.jsonl
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

WRAPPER = "Question: {q}\nAnswer:"


def main() -> None:
    """Parse arguments, run both engines and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("bench/models/demo-olmoe"))
    ap.add_argument("--data", type=Path, default=Path("bench/data/demo/val.jsonl"))
    ap.add_argument("-n", type=int, default=48, help="prompts to check")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from vllm import LLM, SamplingParams

    from bench.synthetic.tasks import read_jsonl
    from tuner.model.load import load_model

    rows = read_jsonl(args.data)[: args.n]
    prompts = [WRAPPER.format(q=r["question"]) for r in rows]
    tm = load_model(str(args.model), dtype="float32", device="cpu", train_routers=False)
    tok, model = tm.tokenizer, tm.model
    answers = [tok.convert_tokens_to_ids(r["choices"][r["answer"]]) for r in rows]

    llm = LLM(model=str(args.model), enforce_eager=True, dtype="float32", max_model_len=256)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))
    v_ids = [o.outputs[0].token_ids[0] for o in outs]

    h_ids = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            h_ids.append(int(model(input_ids=ids).logits[0, -1].argmax()))

    n = len(rows)

    def agree(a: list[int], b: list[int]) -> int:
        return sum(x == y for x, y in zip(a, b, strict=True))

    print(
        f"vLLM loaded {args.model}; {n} prompts, e.g. {prompts[0]!r} -> {tok.decode(v_ids[:1])!r}"
    )
    print(
        f"exact match: vLLM {agree(v_ids, answers) / n:.3f}, transformers {agree(h_ids, answers) / n:.3f}"
    )
    print(f"vLLM and transformers pick the same token: {agree(v_ids, h_ids)}/{n}")


if __name__ == "__main__":
    main()
