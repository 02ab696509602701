"""lm-evaluation-harness's `vllm` model with the roma plugin agrees with `roma-tune eval`.

One local multiple-choice task (a YAML over a parquet file in the test's folder) is scored
twice: by lm-eval's own CLI (`lm_eval --model vllm --model_args JSON`, the form the README
gives: base without the plugin, tuned with `load_format=roma` and
`model_loader_extra_config`), and by `roma-tune eval --data lm-eval:TASK.yaml` (vLLM backend,
base and tuned). Same task definition, same prompts: the accuracies must be equal, and every
choice's log-likelihood the same. Four engine starts in all.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tuner_fixtures import WORDS, mc_rows, tiny_dir  # noqa: F401
from typer.testing import CliRunner

from tuner.cli.app import app

pytestmark = pytest.mark.vllm
TASK = "roma_words"


def _task(root: Path) -> Path:
    """A task YAML over a parquet of rows: single-token and multi-token choices."""
    import pandas as pd

    rng = random.Random(7)
    rows = [{k: r[k] for k in ("question", "choices", "answer")} for r in mc_rows(16, seed=1)]
    words = [w for ws in WORDS.values() for w in ws]
    for _ in range(8):
        choices = [" ".join(rng.sample(words, 2)) for _ in range(3)]
        rows.append({"question": "the " + " ".join(rng.sample(words, 3)), "choices": choices,
                     "answer": rng.randrange(3)})  # fmt: skip
    pd.DataFrame(rows).to_parquet(root / "rows.parquet")
    (root / "tasks").mkdir()
    yaml = root / "tasks" / f"{TASK}.yaml"
    yaml.write_text(
        f"task: {TASK}\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files: {{test: {root / 'rows.parquet'}}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    return yaml


def _lm_eval(model_args: dict, tasks: Path, out: Path) -> tuple[float, dict[int, list[float]]]:
    """lm-eval's CLI in a fresh process: (acc, per-document choice log-likelihoods)."""
    env = {k: v for k, v in os.environ.items() if k != "ROMA_DELTAS"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "vllm"]
    cmd += ["--model_args", json.dumps(model_args), "--include_path", str(tasks)]
    cmd += ["--tasks", TASK, "--num_fewshot", "0", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"][TASK]["acc,none"]
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    lls = {}
    for line in samples.read_text().splitlines():
        doc = json.loads(line)
        lls[doc["doc_id"]] = [float(r[0]) for r in doc["filtered_resps"]]
    return acc, lls


def test_lm_eval_vllm_with_plugin_matches_roma_tune_eval(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("lm_eval", reason="lm-eval is installed by `make setup`")
    from roma_vllm.testing import write_handmade_deltas

    yaml = _task(tmp_path)
    deltas = write_handmade_deltas(tiny_dir, tmp_path / "deltas.safetensors", noise=0.5)
    report_path = tmp_path / "roma.json"
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(tiny_dir), "--deltas", str(deltas), "--data", f"lm-eval:{yaml}",
         "--scoring", "loglik", "--json", str(report_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())

    common = {"pretrained": str(tiny_dir), "dtype": "float32", "max_model_len": 256}
    plugin = {"load_format": "roma", "model_loader_extra_config": {"roma_deltas": str(deltas)}}
    runs = {
        "base": _lm_eval(common, yaml.parent, tmp_path / "lm_base"),
        "tuned": _lm_eval({**common, **plugin}, yaml.parent, tmp_path / "lm_tuned"),
    }
    moved = 0.0
    for variant, (acc, lls) in runs.items():
        assert report["overall"][variant]["n"] == len(lls) == 24
        assert acc == pytest.approx(report["overall"][variant]["accuracy"], abs=1e-12), variant
        for i, sample in enumerate(report["samples"]):
            assert sample["source"] == f"lm-eval:{TASK}:test:{i}"
            assert sample[variant]["scores"] == pytest.approx(lls[i], abs=1e-4), (variant, i)
    for i in range(24):
        base, tuned = runs["base"][1][i], runs["tuned"][1][i]
        moved = max(moved, *(abs(a - b) for a, b in zip(base, tuned, strict=True)))
    assert moved > 1e-2  # the deltas change what lm-eval measures
