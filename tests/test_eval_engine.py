"""`roma-tune eval` engine options and output: flags checked in one line, passed to both vLLM
engines, the first engine's processes gone before the second starts, vLLM's log only with
--verbose, and a failed start reported as one ``Error:`` line naming the cause.

Engine starts (~25 s each on a quiet 2-core machine): two in-process (base and tuned) and
four ``roma-tune eval`` subprocesses (quiet, --verbose, a worker that cannot allocate its KV
cache, an engine that dies in its first forward); one more subprocess fails in vLLM's
configuration, before any engine process.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tuner_fixtures import mc_rows, write_jsonl
from typer.testing import CliRunner

from roma_vllm.testing import write_handmade_deltas
from tuner.cli.app import app
from tuner.config import ConfigError
from tuner.evaluate.backends.vllm import engine_kwargs
from tuner.evaluate.backends.vllm_log import one_line, root_cause
from tuner.evaluate.options import EngineOptions, EvalOptions

# A line of vLLM's own log: "(EngineCore pid=12) INFO 12-04 19:51:22 [core.py:133] ..."
VLLM_LINE = re.compile(r"\((?:MainProcess|EngineCore|Worker|VllmWorker)[^)]*\) (INFO|WARNING)")
ROMA_TUNE = str(Path(sys.executable).with_name("roma-tune"))


@pytest.fixture(scope="module")
def setup(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_engine")
    model = tiny_model("OlmoeForCausalLM")
    deltas = write_handmade_deltas(model, root / "deltas.safetensors", layers=[2, 3])
    data = write_jsonl(root / "test.jsonl", mc_rows(8))
    return {"root": root, "model": model, "deltas": deltas, "data": data}


def _cli(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``roma-tune ARGS`` in a fresh process, stdout and stderr together, TMPDIR=tmp."""
    return subprocess.run(
        [ROMA_TUNE, *args],
        env={**os.environ, "TMPDIR": str(tmp), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )


def _base_args(setup: dict[str, Path]) -> list[str]:
    return ["eval", "--model", str(setup["model"]), "--data", str(setup["data"])]


# ------------------------------------------------------------------ options, no engine


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tensor_parallel_size": 0}, "--tensor-parallel-size: must be a whole number >= 1, got 0"),
        ({"pipeline_parallel_size": -2}, "--pipeline-parallel-size: must be a whole number >= 1"),
        ({"gpu_memory_utilization": 0.0}, r"--gpu-memory-utilization: must be a fraction in \(0, 1\]"),
        ({"gpu_memory_utilization": 1.5}, r"--gpu-memory-utilization: .* got 1.5"),
        ({"gpu_memory_utilization": float("nan")}, "--gpu-memory-utilization: .* got nan"),
        ({"max_model_len": 1}, "--max-model-len: must be >= 2 tokens, got 1"),
        (
            {"backend": "hf", "tensor_parallel_size": 2},
            "--tensor-parallel-size: a vLLM engine option, but --backend is hf",
        ),
        ({"backend": "hf", "enforce_eager": True}, "--enforce-eager: a vLLM engine option"),
    ],
)  # fmt: skip
def test_engine_options_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EvalOptions(model="m", data="d", **kwargs)


def test_bad_engine_option_is_one_error_line(setup: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, [*_base_args(setup), "--gpu-memory-utilization", "2"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --gpu-memory-utilization: must be a fraction in (0, 1], got 2.0"
    ]


def test_engine_kwargs_pass_options_and_leave_defaults_to_vllm(setup: dict[str, Path]) -> None:
    from vllm.engine.arg_utils import EngineArgs

    default = engine_kwargs(setup["model"], dtype="float32", max_model_len=40)
    assert "enforce_eager" not in default and "gpu_memory_utilization" not in default
    assert (default["tensor_parallel_size"], default["pipeline_parallel_size"]) == (1, 1)
    assert default["trust_remote_code"] is False and "load_format" not in default
    opts = EngineOptions(
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        gpu_memory_utilization=0.7,
        enforce_eager=False,
        trust_remote_code=True,
    )
    tuned = engine_kwargs(
        setup["model"], dtype="bfloat16", max_model_len=40, deltas_path="d.safetensors",
        scale=0.5, options=opts,
    )  # fmt: skip
    assert tuned["dtype"] == "bfloat16" and tuned["max_model_len"] == 40
    assert (tuned["tensor_parallel_size"], tuned["pipeline_parallel_size"]) == (2, 2)
    assert tuned["gpu_memory_utilization"] == 0.7 and tuned["enforce_eager"] is False
    assert tuned["trust_remote_code"] is True and tuned["load_format"] == "roma"
    assert tuned["model_loader_extra_config"]["roma_scale"] == 0.5
    # every key is an engine argument of the installed vLLM (LLM(**kwargs) forwards them)
    fields = set(EngineArgs.__dataclass_fields__)
    assert set(tuned) <= fields, set(tuned) - fields


def test_max_model_len_shorter_than_the_data_is_refused_before_any_engine(
    setup: dict[str, Path],
) -> None:
    from transformers import AutoTokenizer

    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples

    tok = AutoTokenizer.from_pretrained(str(setup["model"]))
    encoded = encode(load_examples(str(setup["data"])).examples, tok, "letter", None, False)
    needed = max(len(e.prompt_ids) for e in encoded) + 1  # letter scoring: prompt + 1 step
    result = CliRunner().invoke(app, [*_base_args(setup), "--max-model-len", str(needed - 1)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: --max-model-len: {needed - 1} tokens is too short for this data: its longest "
        f"request needs {needed} (prompt and continuation, plus one generated)"
    ]


def test_root_cause_is_read_from_the_engine_processes_log() -> None:
    log = "\n".join(
        [
            "(EngineCore pid=7) INFO 12-04 19:56:00 [core.py:133] Initializing a V1 LLM engine",
            "(Worker pid=9) ERROR 12-04 19:56:15 [multiproc_executor.py:900] Traceback (most "
            "recent call last):",
            '(Worker pid=9) ERROR 12-04 19:56:15 [multiproc_executor.py:900]   File "x.py", '
            "line 1, in f",
            "(Worker pid=9) ERROR 12-04 19:56:15 [multiproc_executor.py:900] ValueError: "
            "Available memory on node 0 (18.47/23.54 GiB) is less than requested (1000.0 GiB).",
            "(EngineCore pid=7) ERROR 12-04 19:56:15 [core.py:1510] RuntimeError: Worker failed "
            "with error 'Available memory on node 0 (18.47/23.54 GiB) is less than requested "
            "(1000.0 GiB).', please check the stack trace above for the root cause",
            "Process EngineCore:",
            "RuntimeError: Worker failed with error 'Available memory on node 0 (18.47/23.54 "
            "GiB) is less than requested (1000.0 GiB).', please check the stack trace above "
            "for the root cause",
        ]
    )
    assert root_cause(log) == (
        "ValueError: Available memory on node 0 (18.47/23.54 GiB) is less than requested "
        "(1000.0 GiB)."
    )
    loader = (
        "(Worker_TP1 pid=3) ERROR 12-04 10:00:00 [x.py:1] roma_vllm.settings.RomaLoadError: "
        "d.safetensors: tensor 'a' is not a router of m"
    )
    assert root_cause(loader) == "RomaLoadError: d.safetensors: tensor 'a' is not a router of m"
    assert root_cause("(EngineCore pid=7) INFO 12-04 19:56:00 [core.py:133] fine\n") is None


def test_one_line_of_a_validation_error() -> None:
    import pydantic

    class Config(pydantic.BaseModel):
        n: int

        @pydantic.field_validator("n")
        @classmethod
        def small(cls, v: int) -> int:
            raise ValueError(f"User-specified n ({v}) is too large.\nSee the docs.")

    with pytest.raises(pydantic.ValidationError) as info:
        Config(n=5)
    assert one_line(info.value) == "User-specified n (5) is too large. See the docs."


# ------------------------------------------------------------------ engines


def _engine_processes() -> dict[int, int]:
    """Live (not zombie) descendants of this process: pid -> resident memory in bytes.

    Python's multiprocessing resource tracker, started with the first engine and shared by
    all, is not an engine's.
    """
    import psutil

    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                p.cmdline()
            ):
                out[p.pid] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.vllm
def test_both_engines_get_the_options_and_the_first_is_gone_before_the_second(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The spy keeps every ``LLM`` object referenced, as a caller's variable or a traceback
    might: only the explicit shutdown when the engine's block ends frees its processes."""
    import torch
    import vllm

    from tuner.evaluate.core import evaluate

    original = vllm.LLM.__init__
    starts: list[dict[str, Any]] = []

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        before = _engine_processes()
        original(self, *args, **kwargs)
        started = {pid: rss for pid, rss in _engine_processes().items() if pid not in before}
        starts.append({"llm": self, "before": before, "started": started})

    monkeypatch.setattr(vllm.LLM, "__init__", spy)
    opts = EvalOptions(
        model=str(setup["model"]), data=str(setup["data"]), deltas=str(setup["deltas"]),
        dtype="bfloat16", max_model_len=64, gpu_memory_utilization=0.5, enforce_eager=True,
        trust_remote_code=True,
    )  # fmt: skip
    report = evaluate(opts)
    assert report["overall"]["tuned"]["n"] == 8

    assert len(starts) == 2  # base, then tuned
    for start, load_format in zip(starts, ("auto", "roma"), strict=True):
        config = start["llm"].llm_engine.vllm_config
        assert config.model_config.dtype == torch.bfloat16  # the checkpoint is float32
        assert config.model_config.max_model_len == 64
        assert config.model_config.enforce_eager is True
        assert config.model_config.trust_remote_code is True
        assert config.cache_config.gpu_memory_utilization == 0.5
        assert config.parallel_config.tensor_parallel_size == 1
        assert config.parallel_config.pipeline_parallel_size == 1
        assert config.load_config.load_format == load_format
    first, second = starts
    # the base engine had its own processes (engine core, worker) holding memory ...
    assert len(first["started"]) >= 2 and sum(first["started"].values()) > 100 * 2**20
    # ... and none of them was alive when the tuned engine started
    assert not set(first["started"]) & set(second["before"]), first["started"]
    assert not set(second["started"]) & set(_engine_processes())
    # quiet: nothing of vLLM's reached this process's stdout/stderr
    out, err = capfd.readouterr()
    assert not VLLM_LINE.search(out + err), (out + err)[-3000:]


@pytest.mark.vllm
def test_eval_prints_its_table_and_no_vllm_log(setup: dict[str, Path], tmp_path: Path) -> None:
    result = _cli([*_base_args(setup), "--enforce-eager"], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) < 15, result.stdout
    assert not VLLM_LINE.search(result.stdout), result.stdout
    assert "Loading safetensors" not in result.stdout and "Triton" not in result.stdout
    assert any(line.startswith("│ all ") for line in lines), result.stdout  # the table
    assert list(tmp_path.glob("roma-eval-vllm-*.log")) == []  # the log of a clean run is gone


@pytest.mark.vllm
def test_verbose_shows_vllm_log_with_the_options(setup: dict[str, Path], tmp_path: Path) -> None:
    args = [*_base_args(setup), "--verbose", "--enforce-eager", "--dtype", "bfloat16"]
    result = _cli([*args, "--max-model-len", "64", "--gpu-memory-utilization", "0.5"], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert len(VLLM_LINE.findall(result.stdout)) > 20
    # the worker's own lines too (it loads the model), whichever kernels this CPU gets
    model = re.escape(str(setup["model"]))
    worker = rf"\((?:Worker|VllmWorker)[^)]*\) INFO .*Starting to load model {model}"
    assert re.search(worker, result.stdout), result.stdout[-4000:]
    m = re.search(r"non-default args: (\{.*\})", result.stdout)
    assert m, result.stdout[-4000:]
    args_seen = ast.literal_eval(m.group(1))
    assert args_seen["dtype"] == "bfloat16" and args_seen["max_model_len"] == 64
    assert args_seen["gpu_memory_utilization"] == 0.5 and args_seen["enforce_eager"] is True
    assert any(line.startswith("│ all ") for line in result.stdout.splitlines())


@pytest.mark.vllm
def test_a_worker_start_failure_is_one_line_naming_the_cause(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """The worker cannot reserve a 1000-GiB KV cache: the cause is only in its own log."""
    result = _cli([*_base_args(setup), "--enforce-eager"], tmp_path, VLLM_CPU_KVCACHE_SPACE="1000")
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout[-4000:]
    logs = list(tmp_path.glob("roma-eval-vllm-*.log"))
    assert len(logs) == 1  # kept, and named in the error
    assert lines[0].startswith(f"Error: vLLM could not start the base model ({setup['model']}): ")
    assert "ValueError: Available memory on node" in lines[0]
    assert "1000.0 GiB" in lines[0] and f"vLLM's log: {logs[0]}" in lines[0]


@pytest.mark.vllm
def test_a_configuration_failure_is_one_line_naming_the_cause(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    result = _cli([*_base_args(setup), "--enforce-eager", "--max-model-len", "100000"], tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout[-4000:]
    assert lines[0].startswith("Error: vLLM could not start the base model")
    assert "User-specified max_model_len (100000) is greater than the derived" in lines[0]


def _tiny_qwen3_next(out: Path, tokenizer: Any) -> Path:
    """A tiny Qwen3-Next checkpoint (linear-attention layers): vllm-cpu starts it, then its CPU
    linear-attention kernel refuses float32 in the first forward, on every CPU."""
    import torch
    import transformers

    config = transformers.Qwen3NextConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=128,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"],
        max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["Qwen3NextForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3NextForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.vllm
def test_an_engine_that_dies_after_start_up_is_one_line_blaming_vllm(
    setup: dict[str, Path], tiny_tokenizer: Any, tmp_path: Path
) -> None:
    """vLLM's own failure in the first forward: one ``Error:`` line saying vLLM failed, with
    the worker's exception read from vLLM's log (kept, named), never "Bug: ... roma-vllm"."""
    model = _tiny_qwen3_next(tmp_path / "qwen3-next", tiny_tokenizer)
    args = ["eval", "--model", str(model), "--data", str(setup["data"]), "--enforce-eager"]
    result = _cli([*args, "--dtype", "float32"], tmp_path)
    assert result.returncode == 1, result.stdout[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout[-4000:]
    logs = list(tmp_path.glob("roma-eval-vllm-*.log"))
    assert len(logs) == 1  # kept, and named in the error
    head = f"Error: vLLM failed while running the base model ({model}): "
    tail = f" (vLLM's log: {logs[0]}; --verbose prints it)"
    assert lines[0].startswith(head) and lines[0].endswith(tail), lines[0]
    cause = lines[0].removeprefix(head).removesuffix(tail)
    # the cause is the exception a worker logged while generating, not vLLM's generic wrapper
    worker_errors = [
        line for line in logs[0].read_text().splitlines()
        if re.match(r"\((?:Worker|VllmWorker)[^)]*\) ERROR", line) and line.endswith(cause)
    ]  # fmt: skip
    assert worker_errors, cause
    assert re.match(r"[A-Za-z]+Error: \S", cause) and "EngineDeadError" not in cause, cause
