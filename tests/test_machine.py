"""The machine report that heads ``make test`` (roma_vllm.testing.machine)."""

from __future__ import annotations

import pytest
import torch

from roma_vllm.attention_backend import FLOAT32_MLA_BACKEND
from roma_vllm.testing.machine import RELEVANT_FLAGS, cpu_flags, cpu_model, report_lines

# Two processors as Linux lists them; the first "flags" line counts (all cores agree)
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
# avx512f must not be read from "avx512fp16", nor amx_tile from a bugs line
ZEN3 = """processor\t: 0
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu sse avx avx2 avx512fp16_not_a_flag
bugs\t\t: amx_tile
"""


@pytest.mark.parametrize(
    ("text", "model", "present"),
    [
        (SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8480+", set(RELEVANT_FLAGS)),
        (ZEN3, "AMD EPYC 7763 64-Core Processor", {"avx2"}),
        ("", "unknown", set()),  # no /proc/cpuinfo (not Linux)
    ],
)
def test_cpu_model_and_flags_from_cpuinfo(text: str, model: str, present: set[str]) -> None:
    assert cpu_model(text) == model
    assert cpu_flags(text) == {flag: flag in present for flag in RELEVANT_FLAGS}


def test_report_names_cpu_torch_and_vllm_choices() -> None:
    lines = report_lines(SAPPHIRE_RAPIDS)
    assert lines[0] == (
        "CPU: Intel(R) Xeon(R) Platinum 8480+; "
        "amx_tile=yes amx_bf16=yes avx512f=yes avx512_bf16=yes avx2=yes"
    )
    assert lines[1].endswith(f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    attention = next(line for line in lines if line.startswith("vLLM attention: "))
    # what roma-vllm asks for float32 MLA is the same on every CPU; vLLM's defaults are not
    assert attention.endswith(f", {FLOAT32_MLA_BACKEND} as roma-vllm asks"), attention
    assert any(
        line.startswith("vLLM fused MoE (unquantized) kernels usable here: ") for line in lines
    )
