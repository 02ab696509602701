"""``--max-length``: prompts cut from the left so every sequence fits in N tokens.

The end of a prompt is what the model answers from and where RoMA reads the routing, so
tokens are dropped from the front; a leading BOS the tokenizer put there stays first. The
longest continuation (or free-form target) of a row is kept whole: a row whose
continuation alone does not fit is refused, naming the row.
"""

from __future__ import annotations

from dataclasses import replace

from tuner.data.prompts import Encoded, EncodeError


def truncate_prompts(
    encoded: list[Encoded], max_length: int | None, bos_id: int | None = None
) -> tuple[list[Encoded], int]:
    """(rows with prompts cut from the left to fit ``max_length``, how many were cut)."""
    if max_length is None:
        return encoded, 0
    out: list[Encoded] = []
    cut = 0
    for i, e in enumerate(encoded):
        over = e.max_len - max_length
        if over <= 0:
            out.append(e)
            continue
        ids = e.prompt_ids
        keep_bos = bos_id is not None and ids[0] == bos_id
        head = ids[:1] if keep_bos else []
        body = ids[len(head) :]
        if over >= len(body):
            raise EncodeError(
                f"--max-length {max_length}: row {i + 1} needs {e.max_len - len(body)} tokens "
                "without its prompt (continuation or target); raise --max-length"
            )
        out.append(replace(e, prompt_ids=head + body[over:]))
        cut += 1
    return out, cut
