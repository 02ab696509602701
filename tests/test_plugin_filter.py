"""Deltas asked for while VLLM_PLUGINS leaves the roma plugin out: refused, never base routing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from roma_vllm.settings import RomaLoadError, refuse_filtered_plugin
from tuner.cli import app


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({"ROMA_DELTAS": "d.safetensors", "VLLM_PLUGINS": "other"}, True),
        ({"ROMA_DELTAS": "d.safetensors", "VLLM_PLUGINS": ""}, True),  # no plugin at all
        ({"ROMA_DELTAS": "d.safetensors", "VLLM_PLUGINS": "other, roma"}, False),
        ({"ROMA_DELTAS": "d.safetensors"}, False),  # unset: every plugin loads
        ({"ROMA_DELTAS": "", "VLLM_PLUGINS": "other"}, False),  # empty: base asked for
        ({"VLLM_PLUGINS": "other"}, False),
    ],
)
def test_refuse_filtered_plugin(env: dict[str, str], refused: bool) -> None:
    if refused:
        with pytest.raises(RomaLoadError, match=r"leaves out the 'roma' plugin"):
            refuse_filtered_plugin(env)
    else:
        refuse_filtered_plugin(env)
    with pytest.raises(RomaLoadError, match=r"^deltas were asked for but VLLM_PLUGINS='x'"):
        refuse_filtered_plugin({"VLLM_PLUGINS": "x"}, deltas_asked=True)


def test_vllm_cli_shim_refuses_in_one_line(tiny_dir: Path) -> None:  # noqa: F811
    env = {**os.environ, "ROMA_DELTAS": "/nowhere/d.safetensors", "VLLM_PLUGINS": "other"}
    proc = subprocess.run(
        [sys.executable, "-m", "roma_vllm.vllm_cli", "serve", str(tiny_dir)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "Error: ROMA_DELTAS is set but VLLM_PLUGINS='other' leaves out the 'roma' plugin, so "
        "vLLM would serve base routing; add roma to VLLM_PLUGINS (or unset it), or unset "
        "ROMA_DELTAS to serve the base model"
    ]


def test_eval_refuses_before_any_engine_starts(
    tiny_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tuner.evaluate.backends.vllm as backend
    from roma_vllm.testing import write_handmade_deltas

    deltas = write_handmade_deltas(tiny_dir, tmp_path / "d.safetensors")
    data = write_jsonl(tmp_path / "d.jsonl", mc_rows(4))
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    monkeypatch.delenv("ROMA_DELTAS", raising=False)
    monkeypatch.setattr(backend, "score_vllm", lambda *a, **k: pytest.fail("an engine started"))
    args = ["eval", "--model", str(tiny_dir), "--deltas", str(deltas), "--data", str(data)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: deltas were asked for but VLLM_PLUGINS='other' leaves out the 'roma' plugin"
    )
