"""bench.common: the README-section writer, result files, machine line and paired statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from bench.common import (
    machine,
    machine_summary,
    mean_std,
    paired_interval,
    write_json,
    write_readme_section,
)
from roma_vllm.testing.machine import RELEVANT_FLAGS as CPU_FLAGS
from roma_vllm.testing.machine import cpu_class, cpu_flags

README = """# Benchmarks

Intro.

## Tuner speed

old speed text

### a sub-heading stays inside the section

more old text

## Serving

serving text

## Table 1 in miniature

table text
"""


def test_section_replaced_and_nothing_else(tmp_path: Path):
    path = tmp_path / "README.md"
    path.write_text(README)
    write_readme_section("## Tuner speed\n\nnew speed text\n", path)
    expected = README.replace(
        "old speed text\n\n### a sub-heading stays inside the section\n\nmore old text\n",
        "new speed text\n",
    )
    assert path.read_text() == expected


def test_last_section_replaced_and_missing_section_appended(tmp_path: Path):
    path = tmp_path / "README.md"
    path.write_text(README)
    write_readme_section("## Table 1 in miniature\n\nnew table\n\n\n", path)
    assert path.read_text() == README.replace("table text\n", "new table\n")
    write_readme_section("## Compatibility\n\nversions\n", path)
    assert path.read_text() == README.replace("table text\n", "new table\n") + (
        "\n## Compatibility\n\nversions\n"
    )


def test_rewriting_a_section_with_its_own_text_changes_nothing(tmp_path: Path):
    path = tmp_path / "README.md"
    path.write_text(README)
    write_readme_section("## Serving\n\nserving text\n", path)
    assert path.read_text() == README


def test_a_heading_that_only_starts_like_another_is_not_replaced(tmp_path: Path):
    path = tmp_path / "README.md"
    path.write_text("# B\n\n## Serving extras\n\nkeep\n\n## Serving\n\nold\n")
    write_readme_section("## Serving\n\nnew\n", path)
    assert path.read_text() == "# B\n\n## Serving extras\n\nkeep\n\n## Serving\n\nnew\n"


def test_section_without_heading_is_refused(tmp_path: Path):
    path = tmp_path / "README.md"
    path.write_text(README)
    with pytest.raises(ValueError, match=r"starts with a '## ' heading, not 'Tuner speed'"):
        write_readme_section("Tuner speed\n\ntext\n", path)
    assert path.read_text() == README


def test_write_json_round_trips_and_leaves_no_temp_file(tmp_path: Path):
    record = {"a": [1, 2.5], "b": {"c": None}}
    out = write_json(tmp_path / "sub" / "r.json", record)
    assert out.read_text() == json.dumps(record, indent=2) + "\n"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json"]


def test_machine_summary_names_the_device_cores_memory_and_libraries():
    cpu = {"cpu": "AMD EPYC", "cpus": 2, "memory_gib": 23.5, "torch": "2.1", "vllm": "0.3"}
    assert (
        machine_summary(cpu, ("torch", "vllm"))
        == "AMD EPYC, 2 cores, 23.5 GiB, torch 2.1, vllm 0.3"
    )
    # results saved before the CPU name was recorded; a GPU named first
    assert machine_summary({"cpus": 2, "torch": "2.1", "cuda": None}) == "CPU, 2 cores, torch 2.1"
    gpu = {"cpu": "x", "cpus": 16, "cuda": "NVIDIA H200", "torch": "2.1"}
    assert machine_summary(gpu) == "NVIDIA H200, 16 cores, torch 2.1"


# /proc/cpuinfo excerpts: a Sapphire Rapids (AMX) core, and an EPYC Zen 4 (AVX-512 BF16)
SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
processor\t: 1
flags\t\t: fpu sse2
"""
ZEN4 = "model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512vl\n"


def test_cpu_flags_read_the_first_flags_line_word_by_word():
    assert cpu_flags(SAPPHIRE) == dict.fromkeys(CPU_FLAGS, True)
    # avx512bw / avx512vl must not count as avx512f, nor amx_int8 as amx_bf16
    assert cpu_flags(ZEN4) == {
        "amx_tile": False, "amx_bf16": False, "avx512f": True, "avx512_bf16": True, "avx2": True
    }  # fmt: skip
    assert cpu_flags("flags : avx512bw amx_int8 avx2\n") == {f: f == "avx2" for f in CPU_FLAGS}
    assert cpu_flags("") == dict.fromkeys(CPU_FLAGS, False)


def test_cpu_class_orders_amx_over_avx512_over_avx2():
    assert cpu_class(cpu_flags(SAPPHIRE)) == "AMX"
    assert cpu_class(cpu_flags(ZEN4)) == "AVX-512 BF16"
    assert cpu_class(cpu_flags("flags : avx2 avx512f amx_tile\n")) == "AVX-512"  # no amx_bf16
    assert cpu_class(cpu_flags("flags : avx2\n")) == "AVX2"
    assert cpu_class(cpu_flags("flags : sse2\n")) == "other"


def test_machine_records_this_cpus_flags_and_torchs_kernel_level():
    import torch

    m = machine()
    words = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            words = set(line.split(":", 1)[1].split())
            break
    assert m["cpu_flags"] == {f: f in words for f in CPU_FLAGS}
    assert m["cpu_class"] == cpu_class(m["cpu_flags"])
    assert m["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_paired_interval_is_the_student_t_interval():
    diffs = [0.005, 0.018, -0.003, 0.011]
    m, lo, hi = paired_interval(diffs)
    ref = stats.t.interval(0.95, len(diffs) - 1, loc=stats.tmean(diffs), scale=stats.sem(diffs))
    assert m == pytest.approx(sum(diffs) / 4)
    assert (lo, hi) == pytest.approx(ref, abs=1e-5)
    assert mean_std([2.0]) == (2.0, 0.0)
    assert math.isnan(paired_interval([0.1])[1])
