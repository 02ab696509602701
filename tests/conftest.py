"""Shared fixtures: tiny random MoE checkpoints built in code, and a vLLM job runner.

``tiny_model(arch, **overrides)`` builds (once per session and set of arguments) a tiny
random checkpoint of ``arch`` with a shared trained tokenizer and returns its directory;
any test file can use it. ``run_vllm_jobs(jobs)`` runs a batch of vLLM engines in one
subprocess (see ``tests/vllm_jobs.py``) and returns their results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Before anything imports vLLM: the CPU worker otherwise reserves most of the machine's RAM.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# Every architecture roma_vllm.testing.tiny can build; all of them are served by vllm-cpu 0.32.
ALL_ARCHITECTURES = [
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "GptOssForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
]


def stored_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of every ``*.safetensors`` file in ``folder``, read directly (tests'
    independent reader, not the project's checkpoint code)."""
    from safetensors import safe_open

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            tensors.update({n: h.get_tensor(n) for n in h.keys()})  # noqa: SIM118
    return tensors


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    """One small trained BPE tokenizer shared by every tiny model of the session."""
    from roma_vllm.testing.tiny import corpus, train_tokenizer

    return train_tokenizer(corpus())


@pytest.fixture(scope="session")
def tiny_model(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any
) -> Callable[..., Path]:
    """``tiny_model(arch, **kwargs)`` -> checkpoint directory, built once per argument set.

    ``kwargs`` go to :func:`roma_vllm.testing.tiny.build_tiny_model` (``seed``, ``dtype``,
    ``router_std`` or config overrides such as ``num_hidden_layers``).
    """
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def build(architecture: str = "OlmoeForCausalLM", **kwargs: Any) -> Path:
        from roma_vllm.testing.tiny import build_tiny_model

        key = architecture + "".join(f"-{k}={kwargs[k]}" for k in sorted(kwargs))
        if key not in built:
            out = root / key.replace("/", "_").replace(".", "_")
            built[key] = build_tiny_model(out, architecture, tokenizer=tiny_tokenizer, **kwargs)
        return built[key]

    return build


def run_vllm_jobs_in_subprocess(
    jobs: dict[str, dict], workdir: Path, env: dict[str, str] | None = None, timeout: int = 900
) -> dict[str, dict]:
    """Run ``jobs`` with tests/vllm_jobs.py in a fresh Python; return its results."""
    jobs_path, results_path = workdir / "jobs.json", workdir / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "vllm_jobs.py"), str(jobs_path), str(results_path)],
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not results_path.exists():
        raise RuntimeError(f"vllm_jobs.py failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(results_path.read_text())


@pytest.fixture(scope="session")
def run_vllm_jobs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., dict[str, dict]]:
    """``run_vllm_jobs(jobs, env=None)``: one subprocess, one in-process engine per job."""

    def run(jobs: dict[str, dict], env: dict[str, str] | None = None) -> dict[str, dict]:
        return run_vllm_jobs_in_subprocess(jobs, tmp_path_factory.mktemp("vllm_jobs"), env)

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The machine's CPU flags and the kernels vLLM picks on it: failures depend on them.
    A summary section, not ``pytest_report_header``: ``make test`` runs ``pytest -q``,
    which prints no header."""
    from roma_vllm.testing.machine import report_lines

    terminalreporter.section("machine")
    for line in report_lines():
        terminalreporter.write_line(line)
