"""Render examples as prompts and tokenise them for scoring.

Scorings for multiple choice (``--scoring``):

* ``letter``: the choices are listed with letters A, B, ... in the prompt; the model is scored
  on the letter tokens at the last prompt position. Letters are scored as " A" (with the
  space) when that is one token; when it is two tokens sharing the same first token (a space
  token), that shared token is appended to the prompt, which leaves the choice ranking
  identical to scoring " A"; otherwise the bare letters "A" are used.
* ``loglik``: each choice is a continuation of the prompt (``" " + choice``, tokenised apart
  from the prompt, as lm-evaluation-harness does), scored by its summed log-likelihood. When
  every choice is a single token, the sample is scored like letters: one forward pass.

Free-form rows are scored on their completion tokens (tokenised apart from the prompt).
In every case the routing vector is read at the last token of ``prompt_ids``: the prompt's
own last token. A BOS the tokenizer prepends is kept (the model expects it); an EOS or SEP
it appends is dropped (see :func:`prompt_token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from roma_vllm.errors import RomaError
from tuner.data.sources import LETTERS, Example

Scoring = Literal["letter", "loglik"]
SCORINGS: tuple[str, ...] = ("letter", "loglik")

DEFAULT_TEMPLATES: dict[str, str] = {
    "letter": "Question: {question}\n{choices}\nAnswer:",
    "loglik": "Question: {question}\nAnswer:",
    "free": "{prompt}",
}
PLACEHOLDERS = ("question", "prompt", "choices", "task")


class EncodeError(RomaError, ValueError):
    """A prompt template or tokenizer cannot encode the data; the message says how to fix it."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example, ready for :mod:`tuner.model.forward`."""

    prompt_ids: list[int]  # rendered + tokenised prompt; its last token is "the last prompt token"
    option_ids: list[int] | None  # single-token mode: one token per choice, at the last position
    continuations: list[list[int]] | None  # multi-token loglik: each choice's ids after the prompt
    target_ids: list[int] | None  # free-form completion ids
    label: int | None  # index of the correct choice
    # Multiple-input samples (lm-eval's WinoGrande): one prompt per choice, each followed by
    # its continuation; ``prompt_ids`` is then the gold choice's prompt (whose last token is
    # routed), and row ``j`` is ``prompts[j] + continuations[j]``.
    prompts: list[list[int]] | None = None

    def prompt_len(self, row: int = 0) -> int:
        """Length of the prompt of row ``row`` (the scored continuation starts after it)."""
        return len(self.prompts[row]) if self.prompts is not None else len(self.prompt_ids)

    @property
    def num_rows(self) -> int:
        """Sequences this example costs in a forward pass."""
        return len(self.continuations) if self.continuations is not None else 1

    @property
    def max_len(self) -> int:
        """Longest sequence this example puts in a batch."""
        extra = 0
        if self.continuations is not None:
            if self.prompts is not None:
                pairs = zip(self.prompts, self.continuations, strict=True)
                return max(len(p) + len(c) for p, c in pairs)
            extra = max(len(c) for c in self.continuations)
        elif self.target_ids is not None:
            extra = len(self.target_ids)
        return len(self.prompt_ids) + extra


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        raise EncodeError(
            f"prompt template: unknown placeholder '{{{key}}}'; use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
        )


def choices_block(choices: tuple[str, ...]) -> str:
    """``A. first\\nB. second ...``: the lettered list shown in letter prompts."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def render_prompt(
    example: Example,
    scoring: str,
    template: str | None = None,
    tokenizer: Any = None,
    chat_template: bool = False,
) -> str:
    """The prompt text of ``example``: the template filled in, then the chat template if asked.

    Placeholders: ``{question}`` / ``{prompt}`` (the row's question or prompt), ``{choices}``
    (the lettered list), ``{task}``. Literal braces are written ``{{`` and ``}}``.
    A rendered row's prompt (lm-eval's) is returned as it is.
    """
    if scoring not in SCORINGS:
        raise EncodeError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    if example.rendered:
        if chat_template:
            raise EncodeError(
                f"{example.source}: --chat-template does not apply to lm-eval rows; drop it"
            )
        return example.prompt
    kind = scoring if example.is_choice else "free"
    fmt = template if template is not None else DEFAULT_TEMPLATES[kind]
    fields = _Fields(
        question=example.prompt,
        prompt=example.prompt,
        choices=choices_block(example.choices) if example.choices else "",
        task=example.task,
    )
    try:
        text = fmt.format_map(fields)
    except (ValueError, IndexError) as e:
        raise EncodeError(f"prompt template: {e} (write literal braces as {{{{ and }}}})") from None
    if chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise EncodeError(
                "--chat-template: the tokenizer has no chat template; drop --chat-template"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return text


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_token_ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    """``text``'s ids, with the special tokens the tokenizer puts before it (BOS) but none
    that it appends (EOS, SEP): the last id is always the text's own last token, the one
    that is scored and whose routing is read.
    """
    ids = _ids(tokenizer, text, special)
    if not special:
        return ids
    plain = _ids(tokenizer, text, False)
    if not plain:
        return []
    n = len(plain)
    for start in range(len(ids) - n, -1, -1):  # the last match keeps every prepended token
        if ids[start : start + n] == plain:
            return ids[: start + n]
    # the special tokens changed how the text itself is split: drop appended specials only
    specials = set(getattr(tokenizer, "all_special_ids", []))
    extra = len(ids) - n
    while extra > 0 and ids and ids[-1] in specials:
        ids.pop()
        extra -= 1
    return ids


def letter_tokens(
    tokenizer: Any, n: int, chat_template: bool = False
) -> tuple[list[int], list[int]]:
    """(ids appended to the prompt, one token per letter) for the first ``n`` letters."""
    letters = LETTERS[:n]
    if not chat_template:
        spaced = [_ids(tokenizer, " " + c, False) for c in letters]
        if all(len(t) == 1 for t in spaced):
            return [], [t[0] for t in spaced]
        if all(len(t) == 2 and t[0] == spaced[0][0] for t in spaced):
            return [spaced[0][0]], [t[1] for t in spaced]
    bare = [_ids(tokenizer, c, False) for c in letters]
    if all(len(t) == 1 for t in bare) and len({t[0] for t in bare}) == n:
        return [], [t[0] for t in bare]
    raise EncodeError(
        f"--scoring letter: the tokenizer does not encode the letters {letters} as single tokens; "
        "use --scoring loglik"
    )


def encode(
    examples: list[Example],
    tokenizer: Any,
    scoring: Scoring,
    template: str | None = None,
    chat_template: bool = False,
) -> list[Encoded]:
    """Tokenise ``examples`` (same order) for ``scoring``; see the module docstring."""
    if scoring not in SCORINGS:
        raise EncodeError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    special = not chat_template  # a chat template already carries BOS and friends
    sep = "" if chat_template else " "
    letter_cache: dict[int, tuple[list[int], list[int]]] = {}
    out: list[Encoded] = []
    for ex in examples:
        if ex.rendered:  # lm-eval rows: tokenised as lm-eval does (tuner.data.rendered)
            from tuner.data.rendered import encode_rendered

            out.append(encode_rendered(ex, tokenizer, scoring, chat_template))
            continue
        text = render_prompt(ex, scoring, template, tokenizer, chat_template)
        prompt_ids = prompt_token_ids(tokenizer, text, special)
        if not prompt_ids:
            raise EncodeError(f"{ex.source}: the prompt encodes to no tokens")
        if not ex.is_choice:
            target = _ids(tokenizer, ex.completion or "", False)
            if not target:
                raise EncodeError(f"{ex.source}: field 'completion': encodes to no tokens")
            out.append(Encoded(prompt_ids, None, None, target, None))
            continue
        n = len(ex.choices)
        if scoring == "letter":
            if n not in letter_cache:
                letter_cache[n] = letter_tokens(tokenizer, n, chat_template)
            extra, options = letter_cache[n]
            out.append(Encoded(prompt_ids + extra, list(options), None, None, ex.answer))
            continue
        conts = [_ids(tokenizer, sep + c, False) for c in ex.choices]
        if any(not c for c in conts):
            raise EncodeError(f"{ex.source}: field 'choices': a choice encodes to no tokens")
        if all(len(c) == 1 for c in conts) and len({c[0] for c in conts}) == n:
            out.append(Encoded(prompt_ids, [c[0] for c in conts], None, None, ex.answer))
        else:
            out.append(Encoded(prompt_ids, None, conts, None, ex.answer))
    return out
