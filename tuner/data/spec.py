"""The ``--data`` spec: one or several sources, each with an optional column mapping and cap.

Grammar (one source, or several separated by commas)::

    SOURCE[{MAPPING}][@N]

* ``SOURCE``: a ``.jsonl``/``.json``/``.csv`` file, ``hf:NAME[:CONFIG]:SPLIT`` (``SPLIT`` may
  be a slice such as ``test[:100]``), a ``datasets.save_to_disk`` folder (``DIR[:SPLIT]``) or
  ``lm-eval:TASK[:SPLIT][=LOCAL_COPY]`` (:mod:`tuner.data.lmeval`).
* ``{MAPPING}``: which columns hold the question, choices, answer ... when they have other
  names, e.g. ``{question=goal,choices=sol1|sol2,answer=label,answer-base=1}``
  (:mod:`tuner.data.fields`).
* ``@N``: keep at most ``N`` rows of this source, drawn deterministically from the seed.

A spec that names an existing file or folder is that one source, whatever characters it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tuner.data.sources import DataError

_OPEN, _CLOSE = "[{(", "]})"
_CAP = re.compile(r"@([^@\[\]{}()/]*)$")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a spec."""

    text: str  # as written, for messages
    source: str  # the source itself, without mapping and cap
    fields: str | None  # the column mapping inside {...}
    cap: int | None  # at most this many rows


def split_outside_brackets(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` where no bracket (``[]``, ``{}``, ``()``) is open."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_spec(spec: str) -> list[SourceSpec]:
    """The sources of ``spec``; :class:`DataError` for an empty source or a bad cap/mapping."""
    if not spec.strip():
        raise DataError("--data: empty; name a file, folder, hf:NAME:SPLIT or lm-eval:TASK")
    if Path(spec).exists():
        return [SourceSpec(spec, spec, None, None)]
    out = []
    for raw in split_outside_brackets(spec, ","):
        text = raw.strip()
        if not text:
            raise DataError(f"--data {spec}: an empty source between commas")
        out.append(_parse_source(text))
    return out


def _parse_source(text: str) -> SourceSpec:
    if Path(text).exists():
        return SourceSpec(text, text, None, None)
    rest, cap = text, None
    m = _CAP.search(rest)
    if m:
        value = m.group(1)
        if not value.isdigit() or int(value) < 1:
            raise DataError(f"{text}: '@{value}': a cap must be a whole number of rows >= 1")
        rest, cap = rest[: m.start()], int(value)
    fields = None
    if rest.endswith("}"):
        depth = 0
        for i in range(len(rest) - 1, -1, -1):
            depth += {"}": 1, "{": -1}.get(rest[i], 0)
            if depth == 0:
                rest, fields = rest[:i], rest[i + 1 : -1]
                break
        else:
            raise DataError(f"{text}: '}}' without a matching '{{' in the column mapping")
        if not fields.strip():
            raise DataError(f"{text}: empty column mapping '{{}}'")
    if not rest:
        raise DataError(f"{text}: no source before the mapping or cap")
    return SourceSpec(text, rest, fields, cap)


def source_name(source: str) -> str:
    """A short name for a source (the task of its rows in a mixture): the file's stem, the
    folder's name, the dataset's name (with its config), or the lm-eval task."""
    if source.startswith("lm-eval:"):
        task = source[len("lm-eval:") :].split("=", 1)[0]
        return Path(split_outside_brackets(task, ":")[0]).stem
    if source.startswith("hf:"):
        parts = split_outside_brackets(source[3:], ":")
        name = parts[0].rsplit("/", 1)[-1]
        return f"{name}/{parts[1]}" if len(parts) == 3 else name
    path = Path(source)
    if not path.exists() and ":" in source:
        head, _, split = source.rpartition(":")
        if Path(head).is_dir():
            return f"{Path(head).name}:{split}"
    return path.stem if path.suffix else path.name


def with_fields(spec: str, fields: str) -> str:
    """``spec`` with the mapping ``fields`` given to every source that has none of its own."""
    out = []
    for s in parse_spec(spec):
        if s.fields is None and not s.source.startswith("lm-eval:"):
            text = f"{s.source}{{{fields}}}" + (f"@{s.cap}" if s.cap is not None else "")
            out.append(text)
        else:
            out.append(s.text)
    return ",".join(out)
