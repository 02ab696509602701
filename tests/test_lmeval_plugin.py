"""lm-evaluation-harness's `vllm` model with the roma plugin agrees with `roma-tune eval`.

Two local multiple-choice tasks (YAMLs over parquet files in the test's folder) are scored
twice: by lm-eval's own CLI (`lm_eval --model vllm --model_args JSON`, the form the README
gives: base without the plugin, tuned with `load_format=roma` and
`model_loader_extra_config`), and by `roma-tune eval --data lm-eval:TASK.yaml,...` (vLLM
backend, base and tuned). Same task definitions, same prompts: per task the accuracies must be
equal, and every choice's log-likelihood the same. `roma_words` has one context and several
choices; `roma_fill` has multiple inputs (WinoGrande's form: one context per choice, one
shared continuation). Four engine starts in all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tuner_fixtures import WORDS, mc_rows, tiny_dir  # noqa: F401
from typer.testing import CliRunner

from roma_vllm.testing.lm_eval_cli import run_lm_eval
from tuner.cli.app import app

pytestmark = pytest.mark.vllm
TASKS = {"roma_words": 24, "roma_fill": 8}  # task -> documents


def _tasks(root: Path) -> Path:
    """The two task YAMLs and their parquet files; returns the YAMLs' folder."""
    import pandas as pd

    rng = random.Random(7)
    words = [w for ws in WORDS.values() for w in ws]
    rows = [{k: r[k] for k in ("question", "choices", "answer")} for r in mc_rows(16, seed=1)]
    for _ in range(8):  # multi-token choices
        choices = [" ".join(rng.sample(words, 2)) for _ in range(3)]
        rows.append({"question": "the " + " ".join(rng.sample(words, 3)), "choices": choices,
                     "answer": rng.randrange(3)})  # fmt: skip
    fill = []
    for _ in range(8):
        a, b, c, d = rng.sample(words, 4)
        fill.append({"contexts": [f"the {a} and the {b}", f"the {a} and the {c}"],
                     "ending": f"{d} {a}", "gold": rng.randrange(2)})  # fmt: skip
    fields = {
        "roma_words": 'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\ndoc_to_target: answer\n",
        # doc_to_text gives the gold index: lm-eval scores `ending` after each context
        "roma_fill": 'doc_to_text: "{{gold}}"\ndoc_to_choice: contexts\ndoc_to_target: ending\n',
    }
    folder = root / "tasks"
    folder.mkdir()
    for name, table in (("roma_words", rows), ("roma_fill", fill)):
        data = root / f"{name}.parquet"
        pd.DataFrame(table).to_parquet(data)
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: parquet\n"
            f"dataset_kwargs:\n  data_files: {{test: {data}}}\n"
            f"test_split: test\noutput_type: multiple_choice\n{fields[name]}"
            "metric_list:\n  - metric: acc\n"
        )
    return folder


def _lm_eval(model_args: dict, tasks: Path, out: Path) -> dict[str, tuple[float, dict]]:
    """lm-eval's CLI in a fresh process: per task, (acc, choice log-likelihoods per document)."""
    args = ["--model", "vllm", "--model_args", json.dumps(model_args), "--include_path", str(tasks)]
    args += ["--tasks", ",".join(TASKS), "--num_fewshot", "0", "--log_samples"]
    run_lm_eval(args, out)
    (results,) = out.rglob("results_*.json")
    accs = json.loads(results.read_text())["results"]
    per_task = {}
    for task in TASKS:
        (samples,) = out.rglob(f"samples_{task}_*.jsonl")
        lls = {}
        for line in samples.read_text().splitlines():
            doc = json.loads(line)
            lls[doc["doc_id"]] = [float(r[0]) for r in doc["filtered_resps"]]
        per_task[task] = (accs[task]["acc,none"], lls)
    return per_task


def test_lm_eval_vllm_with_plugin_matches_roma_tune_eval(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from roma_vllm.testing import write_handmade_deltas

    tasks = _tasks(tmp_path)
    deltas = write_handmade_deltas(tiny_dir, tmp_path / "deltas.safetensors", noise=0.5)
    report_path = tmp_path / "roma.json"
    data = ",".join(f"lm-eval:{tasks / name}.yaml" for name in TASKS)
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(tiny_dir), "--deltas", str(deltas), "--data", data,
         "--scoring", "loglik", "--enforce-eager", "--json", str(report_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())

    common = {
        "pretrained": str(tiny_dir),
        "dtype": "float32",
        "max_model_len": 256,
        "enforce_eager": True,  # minutes of compilation on CPU otherwise
    }
    plugin = {"load_format": "roma", "model_loader_extra_config": {"roma_deltas": str(deltas)}}
    runs = {
        "base": _lm_eval(common, tasks, tmp_path / "lm_base"),
        "tuned": _lm_eval({**common, **plugin}, tasks, tmp_path / "lm_tuned"),
    }
    for variant, per_task in runs.items():
        for task, (acc, lls) in per_task.items():
            ours = report["per_task"][task][variant]
            assert ours["n"] == len(lls) == TASKS[task]
            assert acc == pytest.approx(ours["accuracy"], abs=1e-12), (variant, task)
            samples = [s for s in report["samples"] if s["task"] == task]
            for i, sample in enumerate(samples):
                assert sample["source"] == f"lm-eval:{task}:test:{i}"
                assert sample[variant]["scores"] == pytest.approx(lls[i], abs=1e-4), (task, i)
    for task in TASKS:  # the deltas change what lm-eval measures
        base, tuned = runs["base"][task][1], runs["tuned"][task][1]
        moved = max(abs(a - b) for i in base for a, b in zip(base[i], tuned[i], strict=True))
        assert moved > 1e-3, task
