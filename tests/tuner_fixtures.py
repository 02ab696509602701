"""Shared fixtures of the tuner tests: a tiny OLMoE checkpoint and small synthetic data.

Import the fixtures into a test module (``from tuner_fixtures import tiny_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

WORDS = {
    "color": ["red", "green", "blue"],
    "fruit": ["apple", "pear", "grape", "lemon"],
    "animal": ["cat", "dog", "bird", "fish"],
    "sky": ["sun", "moon", "star", "cloud"],
}


@pytest.fixture(scope="session")
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random OLMoE checkpoint (4 MoE layers, 8 experts, top-2), float32.

    Shared with the rest of the suite through conftest's ``tiny_model`` when it exists.
    """
    try:
        return request.getfixturevalue("tiny_model")("OlmoeForCausalLM")
    except pytest.FixtureLookupError:
        from roma_vllm.testing.tiny import build_tiny_model

        return build_tiny_model(tmp_path_factory.mktemp("tiny") / "olmoe", "OlmoeForCausalLM")


def mc_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` multiple-choice rows over four word families (one task per family)."""
    rng = random.Random(seed)
    rows = []
    tasks = sorted(WORDS)
    for i in range(n):
        task = tasks[i % len(tasks)]
        words = WORDS[task]
        target = rng.choice(words)
        others = [w for ws in WORDS.values() for w in ws if w not in words]
        choices = [target, *rng.sample(others, 2)]
        rng.shuffle(choices)
        filler = " ".join(rng.choice(["the", "a", "is", "was", "one", "this"]) for _ in range(3))
        rows.append(
            {
                "question": f"{filler} which word is a {task} like {target}",
                "choices": choices,
                "answer": choices.index(target),
                "task": task,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_args(cfg: Any, *extra: str) -> list[str]:
    """`roma-tune run` arguments of a :class:`tuner.config.TuneConfig` (the values that
    differ from the defaults), then ``extra``."""
    args = ["run", "--no-progress"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or value == f.default:
            continue
        flag = "--lambda" if f.name == "lam" else "--" + f.name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return [*args, *extra]
