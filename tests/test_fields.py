"""Column mappings (`SOURCE{question=goal,...}`, `roma-tune data --fields`) and HF split slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuner_fixtures import write_jsonl
from typer.testing import CliRunner

from tuner.cli.app import app
from tuner.data.fields import FieldMap
from tuner.data.sources import DataError, Example, load_examples

PIQA = [
    {"goal": "Dry wet shoes", "sol1": "Stuff them with paper.", "sol2": "Oil them.", "label": 0},
    {"goal": "Open a jar", "sol1": "Smash it.", "sol2": "Run it under hot water.", "label": 1},
]
# SocialIQA's layout: three answer columns, a 1-based label
SIQA = [
    {"context": "Tracy fed the cat.", "question": "Why?", "answerA": "kind", "answerB": "tired",
     "answerC": "lost", "label": "1"},
    {"context": "Jo left.", "question": "Next?", "answerA": "stay", "answerB": "wave",
     "answerC": "go", "label": 3},
]  # fmt: skip
SIQA_MAP = "question=question,choices=answerA|answerB|answerC,answer=label,answer-base=1"


def test_piqa_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "piqa.jsonl", PIQA)
    ds = load_examples(f"{path}{{question=goal,choices=sol1|sol2,answer=label}}")
    assert ds.examples == [
        Example("Dry wet shoes", ("Stuff them with paper.", "Oil them."), 0, None, "default",
                f"{path}:1"),
        Example("Open a jar", ("Smash it.", "Run it under hot water."), 1, None, "default",
                f"{path}:2"),
    ]  # fmt: skip


def test_one_based_answers_become_zero_based(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "siqa.jsonl", SIQA)
    ds = load_examples(f"{path}{{{SIQA_MAP}}}")
    assert [(e.prompt, e.choices, e.answer) for e in ds.examples] == [
        ("Why?", ("kind", "tired", "lost"), 0),
        ("Next?", ("stay", "wave", "go"), 2),
    ]
    # without answer-base the same column is read 0-based: "1" -> 1, 3 -> out of range
    with pytest.raises(DataError, match=r"siqa.jsonl:2: field 'answer': index 3 out of range"):
        load_examples(f"{path}{{question=question,choices=answerA|answerB|answerC,answer=label}}")
    zero = write_jsonl(tmp_path / "zero.jsonl", [{**SIQA[0], "label": 0}])
    with pytest.raises(DataError, match=r"zero.jsonl:1: field 'label' \(answer, answer-base=1\)"):
        load_examples(f"{zero}{{{SIQA_MAP}}}")


def test_boolean_answer_and_list_column(tmp_path: Path) -> None:
    rows = [{"passage": "The sky is blue.", "ans": True, "opts": ["no", "yes"], "kind": "boolq"},
            {"passage": "Fish swim.", "ans": False, "opts": ["no", "yes"], "kind": "boolq"}]  # fmt: skip
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    ds = load_examples(f"{path}{{question=passage,choices=opts,answer=ans,task=kind}}")
    assert [(e.answer, e.task, e.choices) for e in ds.examples] == [
        (1, "boolq", ("no", "yes")),
        (0, "boolq", ("no", "yes")),
    ]
    with pytest.raises(DataError, match=r"a boolean answer \(True\) has no 1-based index"):
        load_examples(f"{path}{{question=passage,choices=opts,answer=ans,answer-base=1}}")


def test_unmapped_fields_keep_their_names_and_missing_columns_are_named(tmp_path: Path) -> None:
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "answer": 1, "task": "phys"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    (ex,) = load_examples(f"{path}{{question=goal,choices=sol1|sol2}}").examples
    assert (ex.answer, ex.task) == (1, "phys")
    with pytest.raises(DataError, match=r"p.jsonl:1: column 'sol3' \(mapped to choices\): missing"):
        load_examples(f"{path}{{question=goal,choices=sol1|sol3}}")


def test_csv_and_save_to_disk_sources(tmp_path: Path) -> None:
    import datasets

    csv = tmp_path / "piqa.csv"
    csv.write_text("goal,sol1,sol2,label\nDry shoes,paper,oil,2\nOpen jar,smash,heat,1\n")
    got = load_examples(f"{csv}{{question=goal,choices=sol1|sol2,answer=label,answer-base=1}}")
    assert [(e.prompt, e.choices, e.answer) for e in got.examples] == [
        ("Dry shoes", ("paper", "oil"), 1),
        ("Open jar", ("smash", "heat"), 0),
    ]
    datasets.Dataset.from_list(SIQA[:1] * 3).save_to_disk(str(tmp_path / "siqa"))
    disk = load_examples(f"{tmp_path / 'siqa'}{{{SIQA_MAP}}}")
    assert [e.answer for e in disk.examples] == [0, 0, 0]


def test_mapping_errors_are_one_line() -> None:
    cases = {
        "question": r"'question': expected FIELD=COLUMN",
        "questoin=goal": r"unknown field 'questoin'; use question, answer",
        "answer-base=2": r"answer-base must be 0 or 1, got '2'",
        "question=a,question=b": r"field 'question' is mapped twice",
        "prompt=a,question=b": r"map either question/choices/answer .* or prompt/completion",
        "choices=a||b": r"choices=a\|\|b: an empty column name",
    }
    for text, message in cases.items():
        with pytest.raises(DataError, match=message):
            FieldMap.parse(text)


def test_hf_split_slices(tmp_path: Path) -> None:
    """`hf:NAME:SPLIT[a:b]` loads the slice (the colon inside the brackets used to split it)."""
    folder = tmp_path / "hub_like"
    folder.mkdir()
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(6)]
    write_jsonl(folder / "test.jsonl", rows)
    head = load_examples(f"hf:{folder}:test[:2]")
    assert [e.prompt for e in head.examples] == ["q0", "q1"]
    mid = load_examples(f"hf:{folder}:test[2:5]")
    assert [e.prompt for e in mid.examples] == ["q2", "q3", "q4"]
    mapped = load_examples(f"hf:{folder}:test[4:]{{question=question,answer=answer}}")
    assert [e.prompt for e in mapped.examples] == ["q4", "q5"]


def test_data_command_applies_fields_and_prints_the_spec(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "siqa.jsonl", SIQA)
    result = CliRunner().invoke(
        app,
        ["data", str(path), "--fields", "question=question,choices=answerA|answerB|answerC,"
         "answer=label", "--answer-base", "1", "--rows", "2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["rows"], report["skipped"], report["tasks"]) == (2, 0, {"default": 2})
    first = report["first_rows"][0]
    assert first == {
        "source": f"{path}:1",
        "task": "default",
        "prompt": "Question: Why?\nA. kind\nB. tired\nC. lost\nAnswer:",
        "choices": ["kind", "tired", "lost"],
        "answer": 0,
        "scored": ["A", "B", "C"],
    }
    assert report["first_rows"][1]["answer"] == 2
    text = CliRunner().invoke(app, ["data", f"{path}{{{SIQA_MAP}}}", "--scoring", "loglik"])
    assert text.exit_code == 0, text.output
    assert text.output.startswith("2 rows in 1 task(s)\n")
    assert '"prompt": "Question: Why?\\nAnswer:"' in text.output
    assert '" kind"' in text.output  # loglik scores " " + choice
