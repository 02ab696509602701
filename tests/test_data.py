"""Data loading: formats, aliases, and the documented one-line errors for bad rows."""

from __future__ import annotations

import json
import re

import pytest

from tuner.data.sources import DataError, Example, load_examples, parse_row


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


GOOD = {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "task": "math"}


def test_jsonl_multiple_choice_and_free_form(tmp_path):
    p = _jsonl(tmp_path, [GOOD, "", {"prompt": "Say hi:", "completion": " hi"}])
    ds = load_examples(str(p))
    assert ds.skipped == 0 and len(ds) == 2
    assert ds.examples[0] == Example("2+2?", ("3", "4"), 1, None, "math", f"{p}:1")
    assert ds.examples[1] == Example("Say hi:", None, None, " hi", "default", f"{p}:3")
    assert ds.tasks == ["default", "math"]


def test_aliases_letters_and_arc_style(tmp_path):
    rows = [
        {"question": "q", "options": ["a", "b", "c"], "label": "C", "subject": "s"},
        {"query": "q", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"},
        {"question": "q", "endings": ["x", "y"], "gold": "0"},
    ]
    ds = load_examples(str(_jsonl(tmp_path, rows)))
    assert [e.answer for e in ds.examples] == [2, 1, 0]
    assert ds.examples[0].task == "s"


def test_json_and_csv(tmp_path):
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"data": [GOOD, GOOD]}))
    assert len(load_examples(str(j))) == 2
    c = tmp_path / "d.csv"
    c.write_text('question,A,B,C,answer\n"multi\nline",x,y,z,B\nq2,x,y,,A\n')
    ds = load_examples(str(c))
    assert ds.examples[0].choices == ("x", "y", "z") and ds.examples[0].answer == 1
    assert ds.examples[1].choices == ("x", "y")
    assert ds.examples[0].source.endswith(":2") and ds.examples[1].source.endswith(":4")
    c2 = tmp_path / "e.csv"
    c2.write_text('question,choices,answer\nq,"[""a"", ""b""]",0\n')
    assert load_examples(str(c2)).examples[0].choices == ("a", "b")


def test_fingerprint_depends_on_content_not_path(tmp_path):
    a = load_examples(str(_jsonl(tmp_path, [GOOD], "a.jsonl")))
    b = load_examples(str(_jsonl(tmp_path, [GOOD], "b.jsonl")))
    c = load_examples(str(_jsonl(tmp_path, [{**GOOD, "answer": 0}], "c.jsonl")))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_limit(tmp_path):
    assert len(load_examples(str(_jsonl(tmp_path, [GOOD] * 5)), limit=2)) == 2


@pytest.mark.parametrize(
    "row, message",
    [
        ({"choices": ["a", "b"], "answer": 0}, "field 'question': missing"),
        ({"question": "q", "answer": 0}, "field 'choices': missing"),
        (
            {"question": "q", "choices": ["a"], "answer": 0},
            "field 'choices': 1 choices, expected 2 to 10",
        ),
        ({"question": "q", "choices": ["a", ""], "answer": 0}, "field 'choices': choice 1 is ''"),
        ({"question": "q", "choices": ["a", "b"]}, "field 'answer': missing"),
        (
            {"question": "q", "choices": ["a", "b"], "answer": 2},
            "field 'answer': index 2 out of range",
        ),
        (
            {"question": "q", "choices": ["a", "b"], "answer": "C"},
            "field 'answer': letter 'C' but the row has only 2 choices",
        ),
        (
            {"question": 3, "choices": ["a", "b"], "answer": 0},
            "field 'question': expected a string, got int",
        ),
        ({"prompt": "p"}, "field 'completion': missing"),
        ({"text": "hello"}, "field 'question': missing; a row needs"),
    ],
)
def test_bad_rows_raise_one_line_errors(tmp_path, row, message):
    p = _jsonl(tmp_path, [GOOD, row])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: {message}")) as info:
        load_examples(str(p))
    assert "\n" not in str(info.value)


def test_invalid_json_line_and_skip_bad_rows(tmp_path):
    p = _jsonl(tmp_path, [GOOD, "{not json", {"question": "q"}, GOOD])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: not valid JSON")):
        load_examples(str(p))
    ds = load_examples(str(p), skip_bad_rows=True)
    assert len(ds) == 2 and ds.skipped == 2


def test_empty_and_missing_sources(tmp_path):
    empty = _jsonl(tmp_path, [""])
    with pytest.raises(DataError, match=re.escape(f"{empty}: no usable rows")):
        load_examples(str(empty))
    with pytest.raises(DataError, match="no such file or folder"):
        load_examples(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(DataError, match="unknown data format .txt"):
        load_examples(str(bad))
    with pytest.raises(DataError, match=re.escape("expected hf:NAME:SPLIT")):
        load_examples("hf:onlyname")


def test_parse_row_rejects_non_objects():
    with pytest.raises(DataError, match=re.escape("f:1: row is a list")):
        parse_row([1, 2], "f:1")
