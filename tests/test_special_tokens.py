"""The scored and routed position is the prompt's own last token, whatever special tokens the
tokenizer adds: a prepended BOS stays in the prompt, an appended EOS never becomes "the last
prompt token" (checked on the ids and on the batch position the forward pass scores)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tuner.data.prompts import encode, render_prompt
from tuner.data.sources import Example
from tuner.model.forward import collate

ROW = Example(
    prompt="which word is a fruit like pear",
    choices=("apple", "red", "cat"),
    answer=0,
    completion=None,
    task="fruit",
    source="rows.jsonl:1",
)
# every choice more than one token: loglik scores them as continuations, one row each
MULTI = Example(
    prompt="which words name a fruit like pear",
    choices=("green apple", "red brick", "the black cat"),
    answer=0,
    completion=None,
    task="fruit",
    source="rows.jsonl:3",
)
ROWS = {"single-token choices": ROW, "multi-token choices": MULTI}
FREE = Example("the cat is on the", None, None, " tree", "default", "rows.jsonl:2")


def _with_post_processor(tiny_tokenizer: Any, single: str) -> Any:
    """The tiny tokenizer with a ``TemplateProcessing`` post-processor (``$A`` is the text)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = tiny_tokenizer
    backend = copy.deepcopy(tok.backend_tokenizer)
    backend.post_processor = TemplateProcessing(
        single=single,
        special_tokens=[("<|bos|>", tok.bos_token_id), ("<|eos|>", tok.eos_token_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )


# post-processor -> (prepends BOS, appends EOS)
PROCESSORS = {
    "$A <|eos|>": (False, True),
    "<|bos|> $A": (True, False),
    "<|bos|> $A <|eos|>": (True, True),
}


@pytest.mark.parametrize("choices", list(ROWS))
@pytest.mark.parametrize("single", list(PROCESSORS))
@pytest.mark.parametrize("scoring", ["letter", "loglik"])
def test_scored_position_is_the_prompts_own_last_token(
    tiny_tokenizer: Any, single: str, scoring: str, choices: str
) -> None:
    tok = _with_post_processor(tiny_tokenizer, single)
    bos, eos = PROCESSORS[single]
    row = ROWS[choices]
    text = render_prompt(row, scoring)
    plain = tok(text, add_special_tokens=False)["input_ids"]
    full = tok(text)["input_ids"]
    # the tokenizer really adds what this case says it adds
    assert (full[0] == tok.bos_token_id) == bos and (full[-1] == tok.eos_token_id) == eos
    expected = ([tok.bos_token_id] if bos else []) + plain

    (enc,) = encode([row], tok, scoring)
    if scoring == "letter":  # letters are scored after the prompt, plus a shared space token
        extra = enc.prompt_ids[len(expected) :]
        assert enc.prompt_ids[: len(expected)] == expected and len(extra) <= 1
        assert all(t not in (tok.bos_token_id, tok.eos_token_id) for t in extra)
        expected = expected + extra
    else:
        assert enc.prompt_ids == expected
        # each choice is " " + choice, tokenised apart from the prompt, without special tokens
        conts = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in row.choices]
        if row is ROW:  # one distinct token each: scored at the last prompt token
            assert [len(c) for c in conts] == [1, 1, 1]
            assert enc.option_ids == [c[0] for c in conts] and enc.continuations is None
        else:
            assert min(len(c) for c in conts) >= 2
            assert enc.continuations == conts and enc.option_ids is None
    assert tok.eos_token_id not in enc.prompt_ids

    batch = collate([enc], [0], tok.pad_token_id)
    width = batch.input_ids.shape[1]
    row, col = divmod(int(batch.last[0]), width)
    assert (row, col) == (0, len(expected) - 1)
    assert int(batch.input_ids[row, col]) == expected[-1]
    if scoring == "loglik" and row is MULTI:
        # one row per choice, each continuing right after the prompt's last token, not
        # after an EOS; the rest of the row is padding
        assert batch.input_ids.shape[0] == len(conts)
        for j, cont in enumerate(conts):
            n = len(expected) + len(cont)
            assert batch.input_ids[j, :n].tolist() == expected + cont
            assert batch.attention_mask[j].tolist() == [1] * n + [0] * (width - n)


@pytest.mark.parametrize("single", list(PROCESSORS))
def test_free_form_target_follows_the_prompt_directly(tiny_tokenizer: Any, single: str) -> None:
    tok = _with_post_processor(tiny_tokenizer, single)
    bos, _ = PROCESSORS[single]
    (enc,) = encode([FREE], tok, "letter")
    plain = tok(FREE.prompt, add_special_tokens=False)["input_ids"]
    assert enc.prompt_ids == ([tok.bos_token_id] if bos else []) + plain
    assert enc.target_ids == tok(" tree", add_special_tokens=False)["input_ids"]


def test_a_literal_special_token_at_the_end_of_the_text_is_kept(tiny_tokenizer: Any) -> None:
    """Only what the post-processor appends is dropped, not a token written in the text."""
    tok = _with_post_processor(tiny_tokenizer, "<|bos|> $A <|eos|>")
    row = Example("which word is a fruit<|eos|>", ("apple", "red"), 0, None, "t", "r:1")
    (enc,) = encode([row], tok, "loglik", template="{question}")
    plain = tok("which word is a fruit<|eos|>", add_special_tokens=False)["input_ids"]
    assert plain[-1] == tok.eos_token_id
    assert enc.prompt_ids == [tok.bos_token_id, *plain]
