"""Mixtures: several sources in one `--data`, tagged by source, `SOURCE@N` caps drawn from the
seed; and a three-source mixture through `roma-tune run` and `roma-tune eval --backend hf`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuner_fixtures import mc_rows, tiny_dir, write_jsonl  # noqa: F401
from typer.testing import CliRunner

from tuner.cli.app import app
from tuner.data.sources import DataError, load_examples
from tuner.data.spec import parse_spec, split_outside_brackets

PHYS = [{"goal": f"the cat is {w}", "sol1": w, "sol2": "fish", "label": i % 2}
        for i, w in enumerate(["red", "green", "blue", "sun", "moon", "star"])]  # fmt: skip
PHYS_MAP = "{question=goal,choices=sol1|sol2,answer=label}"


def test_spec_grammar() -> None:
    assert split_outside_brackets("hf:a:test[:10],b.jsonl{x=a,y=b}@3", ",") == [
        "hf:a:test[:10]",
        "b.jsonl{x=a,y=b}@3",
    ]
    a, b = parse_spec("hf:a:test[:10], b.jsonl{question=q,answer=k}@3")
    assert (a.source, a.fields, a.cap) == ("hf:a:test[:10]", None, None)
    assert (b.source, b.fields, b.cap) == ("b.jsonl", "question=q,answer=k", 3)
    for spec, message in {
        "a.jsonl,,b.jsonl": "an empty source between commas",
        "a.jsonl@0": "a cap must be a whole number of rows >= 1",
        "a.jsonl@ten": "'@ten': a cap must be a whole number",
        "a.jsonl{}": r"empty column mapping '\{\}'",
        "a.jsonl{x=1}}": r"'\}' without a matching '\{'",
        "@5": "no source before the mapping or cap",
    }.items():
        with pytest.raises(DataError, match=message):
            parse_spec(spec)


def test_existing_path_with_comma_is_one_source(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a,b@2.jsonl", mc_rows(3))
    assert len(load_examples(str(path))) == 3


def test_sources_are_tagged_and_capped(tmp_path: Path) -> None:
    tagged = write_jsonl(tmp_path / "words.jsonl", mc_rows(40, seed=1))  # rows carry a task
    phys = write_jsonl(tmp_path / "phys.jsonl", PHYS)  # rows without a task
    spec = f"{tagged}@10,{phys}{PHYS_MAP}"
    ds = load_examples(spec, seed=5)
    alone = load_examples(str(tagged)).examples
    words, rest = ds.examples[:10], ds.examples[10:]
    # the cap keeps 10 of the 40 rows, in their original order, tasks untouched
    positions = [alone.index(e) for e in words]
    assert positions == sorted(positions) and len(set(positions)) == 10
    assert [e.task for e in rest] == ["phys"] * 6 and [e.prompt for e in rest][
        0
    ] == "the cat is red"
    assert ds.sources == [
        {"name": "words", "spec": f"{tagged}@10", "rows": 10, "available": 40, "skipped": 0,
         "tasks": sorted({e.task for e in words})},
        {"name": "phys", "spec": f"{phys}{PHYS_MAP}", "rows": 6, "available": 6, "skipped": 0,
         "tasks": ["phys"]},
    ]  # fmt: skip
    # the same seed keeps the same rows; another seed others (and another fingerprint)
    assert load_examples(spec, seed=5).examples == ds.examples
    other = load_examples(spec, seed=6)
    assert other.examples[:10] != words and other.fingerprint != ds.fingerprint
    # a single source keeps 'default' for rows without a task, as before
    assert {e.task for e in load_examples(f"{phys}{PHYS_MAP}").examples} == {"default"}
    # --limit keeps the first rows of the whole mixture
    assert load_examples(spec, seed=5, limit=12).examples == ds.examples[:12]


def test_a_bad_source_is_named(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", mc_rows(2))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no usable rows"):
        load_examples(f"{good},{empty}")
    with pytest.raises(DataError, match=r"missing.jsonl: no such file or folder"):
        load_examples(f"{good},{tmp_path / 'missing.jsonl'}")


# ------------------------------------------------------------------ run and eval


def _eval(model: Path, deltas: Path, data: str, out: Path) -> dict:
    args = ["eval", "--model", str(model), "--deltas", str(deltas), "--data", data]
    args += ["--backend", "hf", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.mark.slow
def test_three_source_mixture_through_run_and_eval(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    import pandas as pd  # installed with lm-eval's datasets by make setup

    words = write_jsonl(tmp_path / "words.jsonl", mc_rows(24, seed=2))
    phys = write_jsonl(tmp_path / "phys.jsonl", PHYS)
    piqa = tmp_path / "piqa.parquet"
    pd.DataFrame([{"goal": f"which one is {w}", "sol1": w, "sol2": "the dog", "label": 0}
                  for w in ["red", "blue", "green", "a cat"]]).to_parquet(piqa)  # fmt: skip
    sources = [f"{words}@12", f"{phys}{PHYS_MAP}", f"lm-eval:piqa:validation={piqa}"]
    spec = ",".join(sources)
    out = tmp_path / "run"
    args = ["run", "--no-progress", "--model", str(tiny_dir), "--data", spec, "--out", str(out)]
    args += ["--scoring", "loglik", "--epochs", "1", "--batch-size", "8", "--lr", "3e-2"]
    args += ["--layers", "last2", "--dtype", "float32", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sources: words 12, phys 6, piqa 4" in result.output
    recorded = json.loads((out / "config.json").read_text())["data"]
    expected = load_examples(spec, seed=3)
    assert recorded["fingerprint"] == expected.fingerprint and recorded["examples"] == 22
    assert [s["rows"] for s in recorded["sources"]] == [12, 6, 4]

    mixed = _eval(tiny_dir, out, spec, tmp_path / "mixed.json")
    assert mixed["scoring"] == "loglik"  # from the deltas' training config
    per_task = {t: v["base"]["n"] for t, v in mixed["per_task"].items()}
    want = {}
    for e in load_examples(spec).examples:  # eval draws caps with seed 0
        want[e.task] = want.get(e.task, 0) + 1
    assert per_task == want and want["phys"] == 6 and want["piqa"] == 4
    # every sample scores as it does when its source is evaluated alone
    alone = [_eval(tiny_dir, out, s, tmp_path / f"alone{i}.json") for i, s in enumerate(sources)]
    singles = {s["source"]: s for report in alone for s in report["samples"]}
    assert len(singles) == len(mixed["samples"])
    for s in mixed["samples"]:
        for variant in ("base", "tuned"):
            want = singles[s["source"]][variant]["scores"]
            assert s[variant]["scores"] == pytest.approx(want, abs=1e-5)
