"""`lm-eval:TASK[:SPLIT]=LOCAL_COPY`: rows read through lm-eval's own task definitions.

Each benchmark's rows are built here in that dataset's real column layout and types (from
its Hugging Face dataset card and lm-eval's YAML), written as parquet or a save_to_disk
folder, read through the registered lm-eval task with only the data location overridden,
and compared with a hand-written expectation of lm-eval's prompt, choices and gold index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval  # noqa: F401  make setup installs it: a broken install fails, not skips
import pytest
from tuner_fixtures import tiny_dir  # noqa: F401

from tuner.data.prompts import EncodeError, encode
from tuner.data.rendered import pair_ids
from tuner.data.sources import DataError, Example, load_examples


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


def _one(spec: str) -> list[Example]:
    return load_examples(spec).examples


def _check(ex: Example, task: str, prompt: str, choices: list[str], gold: int) -> None:
    assert (ex.task, ex.prompt, list(ex.choices or []), ex.answer) == (task, prompt, choices, gold)


# ------------------------------------------------------------------ the benchmarks


def test_arc_easy_numeric_and_letter_labels(tmp_path: Path) -> None:
    rows = [
        {
            "id": "Mercury_1",
            "question": "Which gas do plants take in?",
            "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        },
        {
            "id": "NYSED_2",
            "question": "What melts ice?",
            "choices": {"text": ["heat", "cold", "dark", "wind"], "label": ["1", "2", "3", "4"]},
            "answerKey": "1",
        },
    ]
    data = _parquet(tmp_path / "arc.parquet", rows)
    a, b = _one(f"lm-eval:arc_easy:test={data}")
    _check(a, "arc_easy", "Question: Which gas do plants take in?\nAnswer:",
           ["oxygen", "carbon dioxide", "helium"], 1)  # fmt: skip
    _check(b, "arc_easy", "Question: What melts ice?\nAnswer:", ["heat", "cold", "dark", "wind"], 0)
    assert a.target_delimiter == " " and a.source == "lm-eval:arc_easy:test:0"


def test_hellaswag_clean_up_and_string_label(tmp_path: Path) -> None:
    rows = [
        {
            "ind": 24,
            "activity_label": "Personal Care and Style",
            "ctx_a": "[header] How to dye your hair. [title] Choose a color.",
            "ctx_b": "pick a SHADE",
            "ctx": "unused",
            "endings": ["[step] Go lighter. [substeps] Try it.", "Wash it [title] now.",
                        "Cut it.", "Leave it."],
            "source_id": "wikihow~1",
            "split": "val",
            "split_type": "indomain",
            "label": "2",
        }
    ]  # fmt: skip
    data = _parquet(tmp_path / "hs.parquet", rows)
    (ex,) = _one(f"lm-eval:hellaswag:validation={data}")
    # " [title]" -> ". ", [bracketed] removed, double spaces halved; ctx_b capitalised
    _check(
        ex,
        "hellaswag",
        "Personal Care and Style: How to dye your hair.. Choose a color. Pick a shade",
        [" Go lighter. Try it.", "Wash it. now.", "Cut it.", "Leave it."],
        2,
    )


def test_piqa(tmp_path: Path) -> None:
    rows = [{"goal": "Dry wet shoes", "sol1": "Stuff them with paper.", "sol2": "Oil them.",
             "label": 0}]  # fmt: skip
    (ex,) = _one(f"lm-eval:piqa:validation={_parquet(tmp_path / 'p.parquet', rows)}")
    _check(ex, "piqa", "Question: Dry wet shoes\nAnswer:",
           ["Stuff them with paper.", "Oil them."], 0)  # fmt: skip


def test_boolq_classlabel_from_save_to_disk(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "passage": datasets.Value("string"),
            "idx": datasets.Value("int32"),
            "label": datasets.ClassLabel(names=["False", "True"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "question": ["is the sky blue", "do fish fly"],
            "passage": ["The sky is blue.", "Fish swim."],
            "idx": [0, 1],
            "label": [1, 0],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "boolq"))
    a, b = _one(f"lm-eval:boolq:validation={tmp_path / 'boolq'}")
    _check(a, "boolq", "The sky is blue.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1)
    _check(b, "boolq", "Fish swim.\nQuestion: do fish fly?\nAnswer:", ["no", "yes"], 0)


def test_social_iqa_one_based_string_label(tmp_path: Path) -> None:
    rows = [{"context": "Tracy fed the cat.", "question": "Why?", "answerA": "to be kind",
             "answerB": "to sleep", "answerC": "to run", "label": "1"},
            {"context": "Jo left.", "question": "What next?", "answerA": "stay",
             "answerB": "wave", "answerC": "go home", "label": "3"}]  # fmt: skip
    a, b = _one(f"lm-eval:social_iqa:validation={_parquet(tmp_path / 's.parquet', rows)}")
    _check(a, "social_iqa", "Q: Tracy fed the cat. Why?\nA:",
           ["to be kind", "to sleep", "to run"], 0)  # fmt: skip
    _check(b, "social_iqa", "Q: Jo left. What next?\nA:", ["stay", "wave", "go home"], 2)


def test_sciq_correct_answer_is_last(tmp_path: Path) -> None:
    rows = [{"question": "What do plants make?", "distractor3": "salt", "distractor1": "iron",
             "distractor2": "sand", "correct_answer": "sugar",
             "support": "\n Plants make sugar by photosynthesis."}]  # fmt: skip
    (ex,) = _one(f"lm-eval:sciq:test={_parquet(tmp_path / 'q.parquet', rows)}")
    _check(ex, "sciq",
           "Plants make sugar by photosynthesis.\nQuestion: What do plants make?\nAnswer:",
           ["iron", "sand", "salt", "sugar"], 3)  # fmt: skip


def test_openbookqa_question_stem(tmp_path: Path) -> None:
    rows = [{"id": "7-980", "question_stem": "The sun is responsible for",
             "choices": {"text": ["puppies", "plants sprouting", "ice", "rocks"],
                         "label": ["A", "B", "C", "D"]},
             "answerKey": "B"}]  # fmt: skip
    (ex,) = _one(f"lm-eval:openbookqa:test={_parquet(tmp_path / 'o.parquet', rows)}")
    _check(ex, "openbookqa", "The sun is responsible for",
           ["puppies", "plants sprouting", "ice", "rocks"], 1)  # fmt: skip


def test_copa_connector_and_string_gold(tmp_path: Path) -> None:
    rows = [{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
             "choice2": "He got a hole in his sock.", "question": "cause", "idx": 0, "label": 0},
            {"premise": "I tipped the bottle.", "choice1": "The liquid froze.",
             "choice2": "The liquid poured out.", "question": "effect", "idx": 1,
             "label": 1}]  # fmt: skip
    a, b = _one(f"lm-eval:copa:validation={_parquet(tmp_path / 'c.parquet', rows)}")
    _check(a, "copa", "The man broke his toe because",
           [" he dropped a hammer on his foot.", " he got a hole in his sock."], 0)  # fmt: skip
    _check(b, "copa", "I tipped the bottle therefore",
           [" the liquid froze.", " the liquid poured out."], 1)  # fmt: skip


def test_mmlu_description_and_letters(tmp_path: Path) -> None:
    rows = [{"question": " What is 2+2? ", "subject": "elementary_mathematics",
             "choices": ["3", "4", "5", "6"], "answer": 1}]  # fmt: skip
    data = _parquet(tmp_path / "m.parquet", rows)
    (ex,) = _one(f"lm-eval:mmlu_elementary_mathematics:test={data}")
    _check(
        ex,
        "mmlu_elementary_mathematics",
        "The following are multiple choice questions (with answers) about elementary "
        "mathematics.\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
        ["A", "B", "C", "D"],
        1,
    )


def test_bigbench_multiple_choice(tmp_path: Path) -> None:
    rows = [{"idx": 0, "inputs": "Q: Which is a bird?\n  choice: cat\n  choice: owl\nA:",
             "targets": ["owl"], "multiple_choice_targets": ["cat", "owl"],
             "multiple_choice_scores": [0, 1]},
            {"idx": 1, "inputs": "free-form row", "targets": ["x"],
             "multiple_choice_targets": [], "multiple_choice_scores": []}]  # fmt: skip
    data = _parquet(tmp_path / "bb.parquet", rows)
    name = "bigbench_abstract_narrative_understanding_multiple_choice"
    examples = _one(f"lm-eval:{name}:default={data}")
    assert len(examples) == 1  # the task's process_docs drops rows without choices
    _check(examples[0], name, rows[0]["inputs"], ["cat", "owl"], 1)


def test_gsm8k_becomes_free_form(tmp_path: Path) -> None:
    answer = "She sold 48/2 = <<48/2=24>>24 clips in May.\n#### 24"
    rows = [{"question": "Natalia sold clips to 48 friends. How many?", "answer": answer}]
    (ex,) = _one(f"lm-eval:gsm8k:test={_parquet(tmp_path / 'g.parquet', rows)}")
    assert not ex.is_choice
    assert (ex.prompt, ex.completion, ex.task) == (
        "Question: Natalia sold clips to 48 friends. How many?\nAnswer:",
        " " + answer,
        "gsm8k",
    )


WINO = [
    {"sentence": "The trophy did not fit in the case because _ was too big.",
     "option1": "trophy", "option2": "case", "answer": "1"},
    {"sentence": "Sam gave Bo a book since _ liked reading.", "option1": "Sam",
     "option2": "Bo", "answer": "2"},
]  # fmt: skip


def test_winogrande_multiple_input(tmp_path: Path) -> None:
    data = _parquet(tmp_path / "w.parquet", WINO)
    a, b = _one(f"lm-eval:winogrande:validation={data}")
    # one context per option (the sentence up to "_" + option), one shared continuation
    contexts = ["The trophy did not fit in the case because trophy",
                "The trophy did not fit in the case because case"]  # fmt: skip
    assert (a.choices, a.continuation, a.answer, a.prompt) == (
        tuple(contexts),
        " was too big.",
        0,
        contexts[0],
    )
    assert (b.choices, b.continuation, b.answer) == (
        ("Sam gave Bo a book since Sam", "Sam gave Bo a book since Bo"),
        " liked reading.",
        1,
    )
    assert b.prompt == "Sam gave Bo a book since Bo"  # the gold context: routed there


def test_multiple_input_scores_equal_a_plain_forward(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Each choice's context + the shared continuation, scored in one padded batch, equals a
    plain transformers forward per choice; the routed position is the gold context's end."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.evaluate.backends.hf import load_eval_model, score_hf
    from tuner.model.forward import collate

    examples = _one(f"lm-eval:winogrande:validation={_parquet(tmp_path / 'w.parquet', WINO)}")
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    encoded = encode(examples, tok, "loglik")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    for ex, enc in zip(examples, encoded, strict=True):
        assert enc.prompts is not None and enc.prompt_ids == enc.prompts[ex.answer]
        for j, context in enumerate(ex.choices or ()):
            assert (enc.prompts[j], enc.continuations[j]) == pair_ids(tok, context, ex.continuation)
    batch = collate(encoded, [0, 1], pad_id=0)
    width = batch.input_ids.shape[1]
    for s, enc in enumerate(encoded):
        row = 2 * s + enc.label  # rows: sample 0's two choices, then sample 1's
        assert batch.last[s] == row * width + len(enc.prompt_ids) - 1
    tm = load_eval_model(tiny_dir, "float32")
    scores = score_hf(tiny_dir, encoded, dtype="float32", deltas=None, pad_id=0, model=tm)
    for enc, got in zip(encoded, scores, strict=True):
        want = []
        for p, c in zip(enc.prompts or [], enc.continuations or [], strict=True):
            with torch.no_grad():
                logp = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
            want.append(sum(logp[len(p) - 1 + t, tid].item() for t, tid in enumerate(c)))
        assert got.scores == pytest.approx(want, abs=1e-4)


# ------------------------------------------------------------------ specs and errors


def test_spec_errors_are_one_line(tmp_path: Path) -> None:
    data = _parquet(tmp_path / "p.parquet", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(DataError, match=r"unknown lm-eval task 'piqaa'; did you mean piqa"):
        load_examples(f"lm-eval:piqaa:validation={data}")
    with pytest.raises(DataError, match=r"mmlu is a group or tag; a local copy holds"):
        load_examples(f"lm-eval:mmlu:test={data}")
    with pytest.raises(DataError, match=r"no such file or folder .*missing.parquet"):
        load_examples(f"lm-eval:piqa:validation={tmp_path / 'missing.parquet'}")
    with pytest.raises(DataError, match=r"unknown data format .txt"):
        (tmp_path / "p.txt").write_text("x")
        load_examples(f"lm-eval:piqa:validation={tmp_path / 'p.txt'}")
    with pytest.raises(DataError, match=r"a column mapping does not apply to lm-eval tasks"):
        load_examples(f"lm-eval:piqa:validation={data}{{question=goal}}")


def test_bad_document_names_row_and_can_be_skipped(tmp_path: Path) -> None:
    rows = [{"goal": "ok", "sol1": "a", "sol2": "b", "label": 1},
            {"goal": "bad", "sol1": "a", "sol2": "b", "label": 5}]  # fmt: skip
    data = _parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(DataError, match=r"lm-eval:piqa:validation:1: gold index 5 out of range"):
        load_examples(f"lm-eval:piqa:validation={data}")
    ds = load_examples(f"lm-eval:piqa:validation={data}", skip_bad_rows=True)
    assert (len(ds), ds.skipped) == (1, 1)


def test_own_task_yaml(tmp_path: Path) -> None:
    data = _parquet(tmp_path / "r.parquet", [{"q": "2+2", "opts": ["3", "4"], "gold": 1}])
    yaml = tmp_path / "mine.yaml"
    yaml.write_text(
        "task: my_sums\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files: {{test: {data}}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Sum: {{q}} ="\ndoc_to_choice: opts\ndoc_to_target: gold\ntarget_delimiter: ""\n'
    )
    (ex,) = _one(f"lm-eval:{yaml}")
    _check(ex, "my_sums", "Sum: 2+2 =", ["3", "4"], 1)
    assert ex.target_delimiter == ""


# ------------------------------------------------------------------ token ids


class _PairLM:
    """lm-eval's own context/continuation split, on an HF tokenizer (its default: specials)."""

    backend = "causal"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer(string, **kw)["input_ids"]


def test_token_ids_equal_lm_evals_encode_pair(tiny_tokenizer: Any) -> None:
    from lm_eval.api.model import TemplateLM

    lm = _PairLM(tiny_tokenizer)
    for ctx, cont in [("Question: the cat\nAnswer:", " red"), ("the dog is ", "blue fish"),
                      ("sun", "  moon and star"), ("a b c", "")]:  # fmt: skip
        want = TemplateLM._encode_pair(lm, ctx, cont)  # type: ignore[arg-type]
        assert pair_ids(tiny_tokenizer, ctx, cont) == (list(want[0]), list(want[1]))


def test_rendered_rows_encode_as_requests(tiny_tokenizer: Any) -> None:
    ex = Example("the cat is", ("red fish", "blue"), 1, None, "t", "s:1", target_delimiter=" ")
    (enc,) = encode([ex], tiny_tokenizer, "loglik", template="IGNORED {question}")
    conts = [pair_ids(tiny_tokenizer, "the cat is", " " + c) for c in ex.choices or ()]
    assert enc.prompt_ids == conts[0][0] and enc.label == 1
    got = enc.continuations or [[t] for t in enc.option_ids or []]
    assert got == [c for _, c in conts]
    with pytest.raises(EncodeError, match=r"s:1: lm-eval rows are scored by log-likelihood"):
        encode([ex], tiny_tokenizer, "letter")
    with pytest.raises(EncodeError, match=r"--chat-template does not apply to lm-eval rows"):
        encode([ex], tiny_tokenizer, "loglik", chat_template=True)


def test_data_command_shows_lm_eval_rows(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    import json

    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from tuner.cli.app import app

    rows = [{"goal": "Dry wet shoes", "sol1": "Stuff them with paper.", "sol2": "Oil them.",
             "label": 1}]  # fmt: skip
    spec = f"lm-eval:piqa:validation={_parquet(tmp_path / 'p.parquet', rows)}"
    result = CliRunner().invoke(app, ["data", spec, "--model", str(tiny_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["rows"], report["scoring"], report["tasks"]) == (1, "loglik", {"piqa": 1})
    row = report["first_rows"][0]
    prompt = "Question: Dry wet shoes\nAnswer:"
    scored = [" Stuff them with paper.", " Oil them."]
    assert (row["prompt"], row["scored"], row["answer"]) == (prompt, scored, 1)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    pairs = [pair_ids(tok, prompt, s) for s in scored]
    assert row["tokens"] == {"prompt": len(pairs[0][0]), "scored": [len(c) for _, c in pairs]}
    letter = CliRunner().invoke(app, ["data", spec, "--scoring", "letter"])
    assert letter.exit_code == 1
    assert "lm-eval rows are scored by log-likelihood" in letter.output
