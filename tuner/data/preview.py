"""What the tuner sees of a data spec: counts per source and task, and rows as it renders them.

Used by ``roma-tune data`` to check a source before a long run. A row's view holds the prompt
exactly as it is scored (the template filled in, or lm-eval's context), the choices, the gold
index and what is scored for each choice: the letters (``letter``) or the continuation text
(``loglik``: ``" " + choice``, or lm-eval's ``target_delimiter + choice``). With a tokenizer
it adds the token counts of :func:`tuner.data.prompts.encode`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tuner.data.prompts import encode, render_prompt
from tuner.data.rendered import check_rendered
from tuner.data.sources import LETTERS, Dataset, Example, load_examples


def default_scoring(data: Dataset) -> str:
    """``loglik`` when some rows are lm-eval's (they are scored only so), else ``letter``."""
    return "loglik" if any(e.rendered for e in data.examples) else "letter"


def row_view(
    ex: Example, scoring: str, template: str | None = None, tokenizer: Any = None
) -> dict[str, Any]:
    """One example as the tuner scores it (see the module docstring)."""
    if ex.rendered:
        check_rendered(ex, scoring)  # refused here as run/eval refuse it
    view: dict[str, Any] = {"source": ex.source, "task": ex.task}
    view["prompt"] = render_prompt(ex, scoring, template)
    if ex.is_choice:
        choices = list(ex.choices or ())
        view["choices"] = choices
        view["answer"] = ex.answer
        if scoring == "letter" and not ex.rendered:
            view["scored"] = list(LETTERS[: len(choices)])
        elif ex.continuation is not None:  # multiple input: each context, one continuation
            view["scored"] = [ex.continuation] * len(choices)
        else:
            sep = ex.target_delimiter if ex.rendered else " "
            view["scored"] = [f"{sep}{c}" for c in choices]
    else:
        view["completion"] = ex.completion
    if tokenizer is not None:
        enc = encode([ex], tokenizer, scoring, template)[0]  # type: ignore[arg-type]
        tokens: dict[str, Any] = {"prompt": len(enc.prompt_ids)}
        if enc.continuations is not None:
            tokens["scored"] = [len(c) for c in enc.continuations]
        elif enc.option_ids is not None:
            tokens["scored"] = [1] * len(enc.option_ids)
        else:
            tokens["completion"] = len(enc.target_ids or [])
        view["tokens"] = tokens
    return view


def preview(
    spec: str,
    *,
    scoring: str | None = None,
    template: str | None = None,
    rows: int = 3,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Load ``spec`` as ``roma-tune run`` would and describe it (a JSON-ready dict)."""
    data = load_examples(spec, skip_bad_rows=skip_bad_rows, limit=limit, seed=seed)
    scoring = scoring or default_scoring(data)
    per_task = Counter(e.task for e in data.examples)
    return {
        "spec": spec,
        "rows": len(data),
        "skipped": data.skipped,
        "fingerprint": data.fingerprint,
        "scoring": scoring,
        "free_form_rows": sum(not e.is_choice for e in data.examples),
        "sources": data.sources,
        "tasks": dict(sorted(per_task.items())),
        "first_rows": [row_view(e, scoring, template, tokenizer) for e in data.examples[:rows]],
    }
