"""Helpers every bench script shares: paths, atomic result files, the README-section writer,
the machine description, running the product's commands, and paired statistics.

    from bench.common import write_json, write_readme_section, machine, machine_summary

Results are written atomically (``roma_vllm.deltas.atomic_write``): a benchmark stopped
half-way never leaves a truncated JSON or README behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from roma_vllm.deltas import atomic_write
from roma_vllm.testing.machine import cpu_class, cpu_flags, cpu_model, read_cpuinfo

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BENCH_README = BENCH / "README.md"
RESULTS = BENCH / "results"
DEMO_MODEL = BENCH / "models" / "demo-olmoe"
DEMO_DATA = BENCH / "data" / "demo"
TUNE = str(Path(sys.executable).parent / "roma-tune")  # the installed product CLI

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# -- files ---------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename); parents are created."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as indented JSON with a final newline, atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_readme_section(section: str, readme: Path = BENCH_README) -> Path:
    """Replace the section of ``readme`` that starts with ``section``'s first line (a
    ``## `` heading) and runs to the next ``## `` heading; append it if absent. Nothing
    else in the file changes."""
    heading = section.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"a README section starts with a '## ' heading, not {heading!r}")
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    return write_text(readme, text)


# -- the machine ---------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform`` elsewhere)."""
    name = cpu_model(read_cpuinfo())
    return name if name != "unknown" else platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total memory in GiB from ``/proc/meminfo`` (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the results were measured on: CPU (model, instruction-set flags and class, the
    kernel level torch picked), cores, memory, GPU, library versions and the load average at
    the time of the call. Reads versions without importing vLLM."""
    import torch

    cuda = torch.cuda.is_available()
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cpu_flags": flags,
        "cpu_class": cpu_class(flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "vllm": _version("vllm"),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def machine_summary(m: dict[str, Any], libraries: tuple[str, ...] = ("torch",)) -> str:
    """One line for a README: ``AMD EPYC, 2 cores, 23.4 GiB, torch 2.13.0``."""
    parts = [m["cuda"] if m.get("cuda") else m.get("cpu") or "CPU", f"{m['cpus']} cores"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']:g} GiB")
    parts += [f"{lib} {m[lib]}" for lib in libraries if m.get(lib)]
    return ", ".join(parts)


# -- running the product -------------------------------------------------------------------


def run_logged(args: list[str], log: Path) -> None:
    """Run a command from the repository root, appending its output to ``log``; exits with a
    one-line message naming the log if it fails."""
    with log.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed (exit {proc.returncode}), see {log}: {' '.join(args)}")


# -- vLLM load timing ----------------------------------------------------------------------


@contextlib.contextmanager
def vllm_load_timers() -> Iterator[dict[str, list]]:
    """Time model loading inside an in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
    while active: ``["get_model"]`` gets the (wall, CPU) seconds of every ``get_model`` call of
    vLLM's CPU model runner (build the model, stream and merge the weights, post-process),
    ``["loader_own"]`` the roma loader's own work (seconds) of every ``--load-format roma``
    load, as it times it itself. The patched functions are restored on exit."""
    import vllm.v1.worker.cpu_model_runner as runner

    from roma_vllm.loader import RomaModelLoader

    timers: dict[str, list] = {"get_model": [], "loader_own": []}
    real_get_model, real_load_model = runner.get_model, RomaModelLoader.load_model

    def timed_get_model(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return real_get_model(*args, **kwargs)
        finally:
            timers["get_model"].append((time.perf_counter() - t0, time.process_time() - c0))

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = real_load_model(self, *args, **kwargs)
        timers["loader_own"].append(self.overhead_seconds)
        return model

    runner.get_model = timed_get_model
    RomaModelLoader.load_model = load_model  # type: ignore[method-assign]
    try:
        yield timers
    finally:
        runner.get_model = real_get_model
        RomaModelLoader.load_model = real_load_model  # type: ignore[method-assign]


# -- statistics ----------------------------------------------------------------------------


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean paired difference with a two-sided 95% t interval."""
    m, s = mean_std(diffs)
    half = (
        T95.get(len(diffs) - 1, 1.96) * s / math.sqrt(len(diffs))
        if len(diffs) > 1
        else float("nan")
    )
    return m, m - half, m + half
