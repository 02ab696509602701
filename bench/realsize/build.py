"""The benchmark's inputs: the 7B-shaped random checkpoint (built once, reused), its deltas
and the training prompts.

The checkpoint lives in ``bench/.cache/olmoe-7b-random/`` (gitignored). ``COMPLETE`` is
written last, after every shard and the index, and records what was built (generator
version, dtype, seed, shard size, config) and every file's size: a build stopped half-way
has no marker, or one that no longer matches, and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH, write_json

CACHE = BENCH / ".cache" / "olmoe-7b-random"
COMPLETE = ".complete.json"
BUILD_VERSION = 1  # bump when write_random_checkpoint draws different weights
SHARD_BYTES = 5 * 10**9  # Hugging Face's classic shard size: 3 shards, as the real model has
SEED = 0
DTYPE = "bfloat16"
# a model of the same layout small enough to check the benchmark itself in minutes (--smoke)
SMOKE: dict[str, Any] = dict(
    num_hidden_layers=6,
    hidden_size=128,  # head size 32: vLLM's CPU attention has no kernel for 16
    intermediate_size=64,
    num_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def _recipe(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from roma_vllm.testing.olmoe_7b import OLMOE_1B_7B

    config = json.dumps({**OLMOE_1B_7B, **(overrides or {})}, sort_keys=True).encode()
    return {
        "version": BUILD_VERSION,
        "dtype": DTYPE,
        "seed": SEED,
        "shard_bytes": SHARD_BYTES,
        "config_sha256": hashlib.sha256(config).hexdigest()[:16],
    }


def is_complete(folder: Path, overrides: dict[str, Any] | None = None) -> bool:
    """True when ``folder`` holds a finished build of the current recipe (with config
    ``overrides``), every file intact."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("recipe") != _recipe(overrides):
        return False
    files = marker.get("files") or {}
    return bool(files) and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size
        for name, size in files.items()
    )


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the safetensors shards (the weights on disk)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def ensure_checkpoint(
    folder: Path = CACHE, overrides: dict[str, Any] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint in ``folder``, built now if it is missing or incomplete; with how it
    was obtained (reused, or built and how long it took). ``overrides``: config changes
    (the smoke model)."""
    from roma_vllm.testing.olmoe_7b import write_random_checkpoint

    if is_complete(folder, overrides):
        return folder, {"reused": True, "bytes": checkpoint_bytes(folder)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE).unlink(missing_ok=True)
    for leftover in folder.glob(".*.tmp"):  # temp files of a build that was killed
        leftover.unlink()
    free = shutil.disk_usage(folder).free
    if free < 15 * 10**9 and not overrides:
        raise SystemExit(
            f"{folder}: building the 7B-shaped checkpoint needs ~14 GB of disk, "
            f"{free / 1e9:.1f} GB is free"
        )
    print(f"building the random checkpoint in {folder} ...", flush=True)
    t0 = time.perf_counter()
    write_random_checkpoint(
        folder,
        DTYPE,
        SHARD_BYTES if not overrides else 2 * 10**6,
        SEED,
        progress=lambda m: print("  " + m, flush=True),
        **(overrides or {}),
    )
    seconds = round(time.perf_counter() - t0, 1)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.name != COMPLETE}
    marker = {"recipe": _recipe(overrides), "files": files, "build_seconds": seconds}
    write_json(folder / COMPLETE, marker)
    print(f"built in {seconds:.0f} s", flush=True)
    return folder, {"reused": False, "bytes": checkpoint_bytes(folder), "build_seconds": seconds}


def tuned_layers(model: Path) -> list[int]:
    """The last 5 layers (`--layers last5`: every OLMoE layer has a router)."""
    n = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    return list(range(n - 5, n))


def write_deltas(model: Path, out: Path) -> Path:
    """Handmade deltas (each router rolled by one expert) on the last 5 routers."""
    from roma_vllm.testing import write_handmade_deltas

    return write_handmade_deltas(model, out, layers=tuned_layers(model))


_COLOURS = ["red", "green", "blue"]
_ANIMALS = ["cat", "dog", "bird", "fish"]
_FRUITS = ["apple", "pear", "grape", "lemon"]
_THINGS = ["tree", "river", "stone", "cloud", "sun", "moon", "star", "bread"]


def write_prompts(path: Path, n: int = 32) -> Path:
    """``n`` short four-choice questions in the words the checkpoint's tokenizer was trained
    on (JSONL rows ``{question, choices, answer, task}``): one correct word among three
    others, its position turning with the row."""
    kinds = [("colour", _COLOURS), ("animal", _ANIMALS), ("fruit", _FRUITS)]
    rows = []
    for i in range(n):
        task, words = kinds[i % len(kinds)]
        right = words[i % len(words)]
        wrong = [_THINGS[(i + k) % len(_THINGS)] for k in range(3)]
        pos = i % 4
        choices = wrong[:pos] + [right] + wrong[pos:]
        rows.append(
            {
                "question": f"which word is a {task}: the first, the next or the last?",
                "choices": choices,
                "answer": pos,
                "task": task,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
