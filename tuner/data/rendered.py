"""Token ids of rows whose prompt is already rendered (lm-eval rows), as lm-eval makes them.

lm-eval turns a request ``(context, continuation)`` into ids like this (``TemplateLM.
_encode_pair``): whitespace at the end of the context moves to the front of the continuation;
the context is tokenised alone and ``context + continuation`` as a whole, and the
continuation's ids are the whole's ids after the context's length. The model reads
``context_ids + continuation_ids`` and the continuation's log-probabilities are summed.
:func:`pair_ids` does the same, with one difference: an EOS/SEP that the tokenizer appends is
dropped from both encodings (:func:`tuner.data.prompts.prompt_token_ids`; lm-eval keeps it,
which for such tokenizers misaligns its split). A prepended BOS is kept, as lm-eval's
``vllm`` and ``hf`` models keep it by default.

Choices are scored as continuations ``target_delimiter + choice`` (``--scoring loglik``;
``letter`` does not apply: the prompt is lm-eval's, with no lettered list); when every
continuation is one distinct token the sample takes one forward pass, as other loglik rows.
The routing vector is read at the context's last token. Free-form rows (``generate_until``
tasks) use the completion (delimiter included) as the continuation. Multiple-input rows
(WinoGrande) pair each choice's context with the shared continuation; their routing vector
is read at the last token of the gold choice's context.
"""

from __future__ import annotations

from typing import Any

from tuner.data.prompts import Encoded, EncodeError, prompt_token_ids
from tuner.data.sources import Example


def pair_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request, split as lm-eval splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    ctx = prompt_token_ids(tokenizer, context)
    whole = prompt_token_ids(tokenizer, context + continuation)
    return ctx, whole[len(ctx) :]


def check_rendered(ex: Example, scoring: str, chat_template: bool = False) -> None:
    """:class:`EncodeError` when a rendered row cannot be scored with these settings."""
    if chat_template:
        raise EncodeError(
            f"{ex.source}: --chat-template does not apply to lm-eval rows (lm-eval renders "
            "their prompts as plain text); drop --chat-template"
        )
    if ex.is_choice and scoring != "loglik":
        raise EncodeError(
            f"{ex.source}: lm-eval rows are scored by log-likelihood as lm-eval scores them; "
            "use --scoring loglik"
        )


def encode_rendered(
    ex: Example, tokenizer: Any, scoring: str, chat_template: bool = False
) -> Encoded:
    """:class:`Encoded` of a rendered row; :class:`EncodeError` when it cannot be scored."""
    check_rendered(ex, scoring, chat_template)
    delim = ex.target_delimiter or ""
    if not ex.is_choice:
        ctx, target = pair_ids(tokenizer, ex.prompt, ex.completion or "")
        if not ctx or not target:
            raise EncodeError(f"{ex.source}: the prompt or the answer encodes to no tokens")
        return Encoded(ctx, None, None, target, None)
    if ex.continuation is not None:  # multiple input: the choices are the contexts
        pairs = [pair_ids(tokenizer, c, ex.continuation) for c in ex.choices or ()]
    else:
        pairs = [pair_ids(tokenizer, ex.prompt, delim + c) for c in ex.choices or ()]
    conts = [c for _, c in pairs]
    if any(not p for p, _ in pairs):
        raise EncodeError(f"{ex.source}: the prompt encodes to no tokens")
    if any(not c for c in conts):
        raise EncodeError(f"{ex.source}: field 'choices': a choice encodes to no tokens")
    if ex.continuation is not None:
        prompts = [p for p, _ in pairs]
        return Encoded(prompts[ex.answer or 0], None, conts, None, ex.answer, prompts=prompts)
    ctx = pairs[0][0]
    if all(len(c) == 1 for c in conts) and len({c[0] for c in conts}) == len(conts):
        return Encoded(ctx, [c[0] for c in conts], None, None, ex.answer)
    return Encoded(ctx, None, conts, None, ex.answer)
