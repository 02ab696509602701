"""The command line's shape: commands and aliases reach the code they name."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from typer.testing import CliRunner

from tuner.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], False), (["--cache-frozen-layers"], True), (["--cache-prefix"], True)],
)
def test_cache_frozen_layers_and_its_old_spelling(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], expected: bool
) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr("tuner.cli.run._run", lambda cfg, progress: seen.setdefault("cfg", cfg))
    result = runner.invoke(app, ["run", "--model", "m", "--data", "d.jsonl", "--out", "o", *flags])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].cache_frozen_layers is expected


def test_old_spelling_is_hidden_from_help() -> None:
    text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "--cache-frozen-layers" in text
    assert "--cache-prefix" not in text


def test_diagnose_lists_the_diagnostics_and_report_stays() -> None:
    text = runner.invoke(app, ["diagnose", "--help"], env={"COLUMNS": "200"}).output
    assert "report" in text and "transplant" in text
    assert runner.invoke(app, ["report", "--help"]).exit_code == 0


def test_plugin_imports_no_testing_module() -> None:
    code = (
        "import roma_vllm.loader, sys; "
        "print(sorted(m for m in sys.modules if m.startswith('roma_vllm')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    modules = eval(out.strip().splitlines()[-1])  # a printed list of module names
    assert "roma_vllm.loader" in modules
    assert not [m for m in modules if "testing" in m or "tiny" in m]
