"""Prompt rendering and tokenisation for the letter, loglik and free-form scorings."""

from __future__ import annotations

import copy
import re

import pytest

from roma_vllm.testing.tiny import corpus, train_tokenizer
from tuner.data.prompts import EncodeError, encode, letter_tokens, render_prompt
from tuner.data.sources import Example


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus())


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


MC = Example("what is red", ("apple", "blue cat", "sun"), 1, None, "t", "f:1")
FREE = Example("the cat is", None, None, " red", "default", "f:2")


def test_render_defaults_and_user_template():
    assert (
        render_prompt(MC, "letter")
        == "Question: what is red\nA. apple\nB. blue cat\nC. sun\nAnswer:"
    )
    assert render_prompt(MC, "loglik") == "Question: what is red\nAnswer:"
    assert render_prompt(FREE, "loglik") == "the cat is"
    assert render_prompt(MC, "letter", "[{task}] {question}?\n{choices}\n{{x}}") == (
        "[t] what is red?\nA. apple\nB. blue cat\nC. sun\n{x}"
    )
    with pytest.raises(EncodeError, match=re.escape("unknown placeholder '{answer}'")):
        render_prompt(MC, "letter", "{answer}")
    with pytest.raises(EncodeError, match="scoring must be one of letter, loglik"):
        render_prompt(MC, "cloze")


def test_letter_scoring_uses_one_token_per_letter(tok):
    (e,) = encode([MC], tok, "letter")
    extra, options = letter_tokens(tok, 3)
    assert e.continuations is None and e.target_ids is None and e.label == 1
    assert e.option_ids == options and len(set(options)) == 3
    # " A" is [space, A] in the tiny tokenizer: the shared space goes to the prompt
    assert _ids(tok, " A") == extra + [options[0]]
    assert e.prompt_ids == tok(render_prompt(MC, "letter"))["input_ids"] + extra


def test_loglik_tokenises_continuations_apart_from_context(tok):
    (e,) = encode([MC], tok, "loglik")
    assert e.option_ids is None and e.label == 1
    assert e.prompt_ids == tok(render_prompt(MC, "loglik"))["input_ids"]
    assert e.continuations == [_ids(tok, " " + c) for c in MC.choices]
    assert e.num_rows == 3 and e.max_len == len(e.prompt_ids) + 2


def test_loglik_single_token_choices_cost_one_row(tok):
    ex = Example("pick", ("red", "apple"), 0, None, "t", "f:1")
    (e,) = encode([ex], tok, "loglik")
    assert all(len(_ids(tok, " " + c)) == 1 for c in ex.choices)
    assert e.continuations is None and e.num_rows == 1
    assert e.option_ids == [_ids(tok, " red")[0], _ids(tok, " apple")[0]]


def test_free_form_targets(tok):
    (e,) = encode([FREE], tok, "letter")
    assert e.target_ids == _ids(tok, " red") and e.label is None and e.option_ids is None


def test_chat_template(tok):
    with pytest.raises(EncodeError, match="the tokenizer has no chat template"):
        encode([MC], tok, "letter", chat_template=True)
    chat = copy.deepcopy(tok)
    chat.chat_template = "{% for m in messages %}<|bos|>{{ m['content'] }}{% endfor %} Answer"
    text = render_prompt(MC, "loglik", tokenizer=chat, chat_template=True)
    assert text == "<|bos|>Question: what is red\nAnswer: Answer"
    (e,) = encode([MC], chat, "loglik", chat_template=True)
    assert e.prompt_ids[0] == chat.bos_token_id
    assert e.continuations == [_ids(chat, c) for c in MC.choices]  # no leading space in chat
