"""One error handler for every command: the project's own errors print one line, anything
else keeps its traceback and asks for a bug report."""

from __future__ import annotations

import ast
import errno
import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from roma_vllm import __version__
from roma_vllm.errors import RomaError
from tuner.cli.app import app
from tuner.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()

# command line -> (module, function) its body calls, which the test replaces
COMMANDS = {
    "run": (
        ["run", "--no-progress", "--model", "m", "--data", "d", "--out", "o"],
        ("tuner.run.pipeline", "run"),
    ),
    "eval": (["eval", "--model", "m", "--data", "d"], ("tuner.evaluate.core", "main")),
    "merge": (
        ["merge", "--model", "m", "--deltas", "d", "--out", "o"],
        ("tuner.export.merge", "main"),
    ),
    "report": (
        ["report", "--model", "m", "--data", "d", "--out", "o"],
        ("tuner.diagnose.report", "main"),
    ),
    "diagnose report": (
        ["diagnose", "report", "--model", "m", "--data", "d", "--out", "o"],
        ("tuner.diagnose.report", "main"),
    ),
    "diagnose transplant": (
        ["diagnose", "transplant", "--model", "m", "--data", "d"],
        ("tuner.diagnose.transplant", "main"),
    ),
}


def _invoke(monkeypatch: pytest.MonkeyPatch, command: str, exc: BaseException):
    args, (module, name) = COMMANDS[command]

    def fail(*a: object, **kw: object) -> None:
        raise exc

    monkeypatch.setattr(importlib.import_module(module), name, fail)
    return runner.invoke(app, args)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_project_error_is_one_line(monkeypatch, command):
    result = _invoke(monkeypatch, command, ConfigError("--k: must be at least 1, got 0"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: --k: must be at least 1, got 0"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    "exc",
    [
        KeyError(50279),
        ValueError("bad shape"),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp/x/cache/a.npy"),
    ],
    ids=repr,
)
def test_any_other_error_keeps_its_traceback_and_asks_for_a_report(monkeypatch, command, exc):
    result = _invoke(monkeypatch, command, exc)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2] == f"{type(exc).__name__}: {exc}"  # the exception, as Python prints it
    assert lines[-1].startswith(
        f"Bug: {type(exc).__name__} above is an internal error of roma-vllm {__version__}, "
        "not a problem with your input; please report it, with this output, at "
    )
    assert not any(line.startswith("Error: ") for line in lines)  # not dressed as user error


@pytest.mark.parametrize(
    "exc, line",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/srv/runs"),
            "/srv/runs: Permission denied",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/r/x.tmp"),
            "/r/x.tmp: No space left on device",
        ),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    ],
)
def test_the_machine_refusing_a_file_is_one_line(monkeypatch, exc, line):
    result = _invoke(monkeypatch, "merge", exc)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {line}"]


def test_typer_exits_pass_through(monkeypatch):
    import typer

    result = _invoke(monkeypatch, "eval", typer.Exit(2))  # eval: disagreements -> status 2
    assert result.exit_code == 2 and result.output == ""


def _error_line(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_real_user_errors_of_each_command_are_one_line(tmp_path):
    """Errors a user meets today, raised where they happen (no stand-ins)."""
    missing = tmp_path / "missing.json"
    assert _error_line(
        ["eval", "--model", "m", "--data", "d", "--check-against", str(missing)]
    ) == (f"Error: --check-against {missing}: no such file")
    assert _error_line(["eval", "--model", "m", "--data", "d", "--backend", "onnx"]) == (
        "Error: --backend: must be one of vllm, hf, got 'onnx'"
    )
    assert _error_line(["merge", "--model", str(tmp_path), "--deltas", "d", "--out", "o"]) == (
        f"Error: {tmp_path}: no *.safetensors files (roma-vllm reads safetensors only)"
    )
    assert _error_line(["report", "--model", "m", "--data", "d", "--out", "o", "--k", "0"]) == (
        "Error: --k: must be at least 1, got 0"
    )
    out = tmp_path / "run"
    assert _error_line(
        ["run", "--model", "m", "--data", "d", "--out", str(out), "--resume", "--overwrite"]
    ) == ("Error: --overwrite: cannot be used with --resume")
    latin1 = tmp_path / "template.txt"
    latin1.write_bytes("Frage: {question}\nAntwort \xe4:".encode("latin-1"))
    assert _error_line(
        ["run", "--model", "m", "--data", "d", "--out", str(out), "--template", str(latin1)]
    ).startswith(f"Error: --template {latin1}: not UTF-8 text (invalid")
    broken = tmp_path / "report.json"
    broken.write_text('{"samples": [')
    line = _error_line(["eval", "--model", "m", "--data", "d", "--check-against", str(broken)])
    assert line.startswith(f"Error: --check-against {broken}: not a `roma-tune eval --json` report")


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every exception class defined in tuner/ and roma_vllm/."""
    found = []
    for package in ("tuner", "roma_vllm"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and any(
                    re.search(r"(Error|Exception)$", ast.unparse(b)) for b in node.bases
                ):
                    found.append((module, node.name))
    return found


# Internal signals that never leave their module.
INTERNAL = {("tuner.model.frozen_cache", "_Stop"), ("tuner.data.readers", "NotJson")}


def test_every_project_error_type_is_a_roma_error():
    classes = _error_classes()
    assert ("tuner.data.sources", "DataError") in classes  # the scan finds them
    assert ("roma_vllm.settings", "RomaLoadError") in classes
    outside = []
    for module, name in classes:
        if (module, name) in INTERNAL or module.startswith("roma_vllm.testing"):
            continue
        cls = getattr(importlib.import_module(module), name)
        if not issubclass(cls, RomaError):
            outside.append(f"{module}.{name}")
    assert outside == []
