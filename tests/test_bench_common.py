"""bench.common: the README-section writer, result files, machine line and paired statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from bench.common import (
    machine_summary,
    mean_std,
    paired_interval,
    write_json,
    write_readme_section,
)

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


def test_paired_interval_is_the_student_t_interval():
    diffs = [0.005, 0.018, -0.003, 0.011]
    m, lo, hi = paired_interval(diffs)
    ref = stats.t.interval(0.95, len(diffs) - 1, loc=stats.tmean(diffs), scale=stats.sem(diffs))
    assert m == pytest.approx(sum(diffs) / 4)
    assert (lo, hi) == pytest.approx(ref, abs=1e-5)
    assert mean_std([2.0]) == (2.0, 0.0)
    assert math.isnan(paired_interval([0.1])[1])
