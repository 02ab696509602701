"""lm-eval ``generate_until`` rows (GSM8K): ``roma-tune eval`` judges them as lm-eval does.

A local GSM8K copy (its real columns: ``question``, and ``answer`` ending in ``#### N``) is
read through lm-eval's registered ``gsm8k`` task. The unit test checks the answer extraction
on hand-written generations against lm-eval's own filters and metric called directly, and
against a hand-written expectation. The engine test (two engine starts: ours and lm-eval's)
runs ``roma-tune eval`` and ``lm_eval --model vllm`` on the same local task (a YAML that
includes lm-eval's gsm8k.yaml, with a small ``max_gen_toks``) and compares, per row, the
generated text, every filter's extracted answer and its ``exact_match``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lm_eval  # make setup installs it: a broken install fails these tests, not skips them
import pytest
from tuner_fixtures import tiny_dir  # noqa: F401
from typer.testing import CliRunner

from roma_vllm.testing.lm_eval_cli import run_lm_eval
from tuner.cli.app import app
from tuner.data.sources import load_examples

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
    "Weng earns $12 an hour for babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. How much more?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages?",
    "the sun and the moon were 7 and 9",
    "one cat, two owls, 3 mice and 10 rats",
]


def _rows(answers: list[str]) -> list[dict[str, Any]]:
    return [
        {"question": q, "answer": f"Some working.\n#### {a}"}
        for q, a in zip(QUESTIONS, answers, strict=True)
    ]


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


def _lm_eval_reference(text: str, gold: str) -> dict[str, float]:
    """lm-eval's filters and metric, called directly with gsm8k.yaml's settings."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    out = {}
    filters = {
        "strict-match": RegexFilter(regex_pattern="#### (\\-?[0-9\\.\\,]+)"),
        "flexible-extract": RegexFilter(
            regex_pattern="(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1
        ),
    }
    for name, f in filters.items():
        (answer,) = TakeFirstFilter().apply(f.apply([[text]], [{}]), [{}])
        out[name] = exact_match_hf_evaluate(
            predictions=[answer], references=[gold], regexes_to_ignore=ignore, ignore_case=True
        )["exact_match"]
    return out


def test_gsm8k_answer_extraction_is_lm_evals(tmp_path: Path) -> None:
    rows = [
        {"question": "Half of 84?", "answer": "84/2 = <<84/2=42>>42\n#### 42"},
        {"question": "How many pages?", "answer": "1000 pages\n#### 1000"},
    ]
    data = _parquet(tmp_path / "gsm8k.parquet", rows)
    half, pages = load_examples(f"lm-eval:gsm8k:test={data}").examples
    gen = half.generation
    assert gen is not None and gen.context == half.prompt == "Question: Half of 84?\nAnswer:"
    assert gen.until == ("Question:", "</s>", "<|im_end|>") and gen.max_gen_toks == 256
    cases = [  # (row, generated text, strict-match, flexible-extract, extracted by strict)
        (half, " Half of 84 is 42. The answer is 42.", 0.0, 1.0, "[invalid]"),
        (half, " 84 / 2 = 42\n#### 42", 1.0, 1.0, "42"),
        (half, " It is 41.\n#### 41", 0.0, 0.0, "41"),
        (pages, " So 1,000 pages.\n#### 1,000", 1.0, 1.0, "1,000"),
        (pages, " 999 pages", 0.0, 0.0, "[invalid]"),
    ]
    for ex, text, strict, flexible, extracted in cases:
        verdict = ex.generation.judge(text)
        gold = rows[0 if ex is half else 1]["answer"]
        reference = _lm_eval_reference(text, gold)
        assert reference == {"strict-match": strict, "flexible-extract": flexible}, text
        got = {name: f["exact_match"] for name, f in verdict.filters.items()}
        assert got == reference, text
        assert (verdict.filter, verdict.metric) == ("strict-match", "exact_match")
        assert verdict.correct is (strict == 1.0) and verdict.extracted == extracted, text


def test_hf_backend_refuses_generate_until_rows(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    data = _parquet(tmp_path / "gsm8k.parquet", _rows(["72", "10", "5", "624", "16", "13"]))
    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_dir), "--data", f"lm-eval:gsm8k:test={data}",
              "--backend", "hf"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "lm-eval:gsm8k:test:0: lm-eval generate_until rows (gsm8k)" in result.output
    assert "use --backend vllm" in result.output


# ------------------------------------------------------------------ engine test


def _task_yaml(folder: Path, data: Path) -> Path:
    """A task over ``data`` that includes lm-eval's gsm8k.yaml, with 12 new tokens at most."""
    gsm8k = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    folder.mkdir(exist_ok=True)
    path = folder / "roma_gsm8k.yaml"
    path.write_text(
        f"include: {json.dumps(str(gsm8k))}\ntask: roma_gsm8k\ntag: []\n"
        f"dataset_path: parquet\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {{test: {json.dumps(str(data))}}}\n"
        "training_split: null\nfewshot_split: null\ntest_split: test\n"
        "generation_kwargs:\n  until: ['Question:', '</s>', '<|im_end|>']\n"
        "  do_sample: false\n  temperature: 0.0\n  max_gen_toks: 12\n"
    )
    return path


def _lm_eval_samples(model: Path, tasks: Path, out: Path) -> dict[int, dict[str, dict]]:
    """lm-eval's CLI in a fresh process: per document, per filter, its sample record."""
    args = {"pretrained": str(model), "dtype": "float32", "max_model_len": 256}
    args["enforce_eager"] = True  # minutes of compilation on CPU otherwise
    cli = ["--model", "vllm", "--model_args", json.dumps(args), "--include_path", str(tasks)]
    run_lm_eval([*cli, "--tasks", "roma_gsm8k", "--num_fewshot", "0", "--log_samples"], out)
    (samples,) = out.rglob("samples_roma_gsm8k_*.jsonl")
    per_doc: dict[int, dict[str, dict]] = {}
    for line in samples.read_text().splitlines():
        record = json.loads(line)
        per_doc.setdefault(record["doc_id"], {})[record["filter"]] = record
    return per_doc


@pytest.mark.vllm
def test_roma_tune_eval_matches_lm_eval_vllm_on_gsm8k(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    rows = _rows(["72", "10", "5", "624", "16", "13"])
    data = _parquet(tmp_path / "gsm8k.parquet", rows)
    yaml = _task_yaml(tmp_path / "tasks", data)
    report_path = tmp_path / "roma.json"
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(tiny_dir), "--data", f"lm-eval:{yaml}", "--enforce-eager",
         "--json", str(report_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ours = [s["base"] for s in json.loads(report_path.read_text())["samples"]]
    assert len(ours) == len(rows)
    # A row correct by construction: its gold becomes what flexible-extract read from our
    # generation (the model never sees the gold, so lm-eval generates the same text).
    found = [i for i, s in enumerate(ours) if s["lm_eval"]["flexible-extract"]["extracted"]
             != "[invalid]"]  # fmt: skip
    assert found, "the tiny model generated no number: no row can be made correct"
    picked = found[0]
    rows[picked]["answer"] = "#### " + ours[picked]["lm_eval"]["flexible-extract"]["extracted"]
    _parquet(data, rows)
    lm = _lm_eval_samples(tiny_dir, tmp_path / "tasks", tmp_path / "lm")
    mine = load_examples(f"lm-eval:{yaml}").examples  # the rows lm-eval scored
    for i, (sample, ex) in enumerate(zip(ours, mine, strict=True)):
        theirs = lm[i]
        assert sample["text"] == theirs["strict-match"]["resps"][0][0], i
        verdict = ex.generation.judge(sample["text"])  # against the gold lm-eval used
        for name, record in theirs.items():
            assert sample["lm_eval"][name]["extracted"] == record["filtered_resps"][0], (i, name)
            assert verdict.filters[name]["exact_match"] == record["exact_match"], (i, name)
            if i != picked:  # same gold: the report's own metric
                assert sample["lm_eval"][name]["exact_match"] == record["exact_match"], (i, name)
        assert sample["correct"] == bool(theirs["strict-match"]["exact_match"]), i
    assert lm[picked]["flexible-extract"]["exact_match"] == 1.0
