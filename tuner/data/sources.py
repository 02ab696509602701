"""Training and evaluation data: load rows from files or datasets, check them, fingerprint them.

Two kinds of rows are understood:

* multiple choice: ``question`` (str), ``choices`` (2-10 non-empty strings), ``answer`` (a
  0-based index, a digit string, or a letter A-J), optional ``task``. Aliases: ``query`` for
  question; ``options``/``endings`` for choices (also ``{"text": [...], "label": [...]}`` as
  in ARC); ``label``/``gold``/``answerKey`` for answer; ``subject``/``category`` for task.
* free-form: ``prompt`` (str) and ``completion`` (str, used verbatim: include a leading space
  if the text should follow the prompt after one).

Sources: local ``.jsonl``, ``.json`` (a list of rows, or an object holding one list) and
``.csv`` (header row; ``choices`` as a JSON list, or columns ``A``..``J`` / ``choice1``..),
Hugging Face datasets as ``hf:NAME[:CONFIG]:SPLIT`` (``SPLIT`` may be a slice such as
``test[:100]``), ``datasets.save_to_disk`` folders (``DIR`` or ``DIR:SPLIT``) and
lm-evaluation-harness tasks as ``lm-eval:TASK[:SPLIT][=LOCAL_COPY]`` (:mod:`tuner.data.lmeval`).
A spec may name several sources, each with a column mapping and a row cap
(:mod:`tuner.data.spec`, :mod:`tuner.data.mixture`).

A bad row raises :class:`DataError` with one line ``FILE:LINE: field 'x': what is wrong``;
with ``skip_bad_rows=True`` bad rows are skipped and counted instead.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roma_vllm.errors import RomaError
from tuner.data.readers import Unparsable as _Unparsable
from tuner.data.readers import csv_rows as _csv_rows
from tuner.data.readers import json_rows as _json_rows
from tuner.data.readers import jsonl_rows as _jsonl_rows

LETTERS = string.ascii_uppercase[:10]  # A-J: at most 10 choices
MIN_CHOICES, MAX_CHOICES = 2, 10

_QUESTION_KEYS = ("question", "query")
_CHOICES_KEYS = ("choices", "options", "endings")
_ANSWER_KEYS = ("answer", "label", "gold", "answerKey")
_TASK_KEYS = ("task", "subject", "category")


class DataError(RomaError, ValueError):
    """A data row or source is unusable; the message is one line naming file, line and field."""


@dataclass(frozen=True)
class Example:
    """One training or evaluation sample."""

    prompt: str  # the question (multiple choice) or the prompt (free-form)
    choices: tuple[str, ...] | None  # None for free-form rows
    answer: int | None  # index of the correct choice (multiple choice)
    completion: str | None  # free-form target
    task: str  # "default" when the row has none
    source: str  # "FILE:LINE", for messages
    # Set for rows rendered by lm-eval (``lm-eval:`` sources): ``prompt`` is then the final
    # context text (no template applied), choice ``c`` is scored as the continuation
    # ``target_delimiter + c`` and ``completion`` already starts with the delimiter.
    target_delimiter: str | None = None
    # Multiple-input rows (lm-eval's WinoGrande): the one continuation every choice is scored
    # on; ``choices`` are then the per-choice contexts and ``prompt`` the gold one.
    continuation: str | None = None
    # Rows of lm-eval ``generate_until`` tasks (GSM8K): what ``eval`` needs to generate and
    # judge them as lm-eval does (:class:`tuner.data.lmeval_generate.Generation`).
    generation: Any = field(default=None, compare=False, repr=False)

    @property
    def is_choice(self) -> bool:
        return self.choices is not None

    @property
    def rendered(self) -> bool:
        """The prompt is final text (rendered by lm-eval); templates do not apply."""
        return self.target_delimiter is not None


@dataclass
class Dataset:
    """Loaded examples, how many bad rows were skipped, and a content fingerprint."""

    examples: list[Example]
    skipped: int
    fingerprint: str
    path: str
    # per source of the spec: name, spec, rows (kept), available (before a cap), skipped
    sources: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.examples})


def fingerprint_examples(examples: list[Example]) -> str:
    """Hash of the examples' content (not their file names or line numbers)."""
    h = hashlib.sha256()
    for e in examples:
        row = [e.prompt, list(e.choices) if e.choices else None, e.answer, e.completion, e.task]
        if e.target_delimiter is not None:  # only then, so older fingerprints stay valid
            row.append(e.target_delimiter)
        if e.continuation is not None:
            row.append(e.continuation)
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def load_examples(
    spec: str, *, skip_bad_rows: bool = False, limit: int | None = None, seed: int = 0
) -> Dataset:
    """Load and check the rows of ``spec``: one source (a file, ``hf:NAME[:CONFIG]:SPLIT``, a
    datasets folder, ``lm-eval:TASK[:SPLIT]``) or several, comma-separated, each optionally
    with a column mapping ``{...}`` and a cap ``@N`` (see :mod:`tuner.data.spec`). ``limit``
    keeps the first rows; ``seed`` draws the rows a cap keeps.

    Raises :class:`DataError` for a missing/unreadable source, a bad row (unless
    ``skip_bad_rows``), or when no usable row is left.
    """
    from tuner.data.mixture import load_mixture  # imports this module

    return load_mixture(spec, skip_bad_rows=skip_bad_rows, limit=limit, seed=seed)


def parse_row(row: Any, where: str) -> Example:
    """One raw row (a mapping) -> :class:`Example`; :class:`DataError` on anything wrong."""
    if isinstance(row, _Unparsable):
        raise DataError(f"{where}: {row.reason}")
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: row is a {type(row).__name__}, expected an object with fields")
    task = _task(row, where)
    if _first(row, _CHOICES_KEYS) is not None or _first(row, _QUESTION_KEYS) is not None:
        return _choice_row(row, where, task)
    if "prompt" in row or "completion" in row:
        prompt = _text(row, "prompt", where)
        completion = _text(row, "completion", where)
        return Example(prompt, None, None, completion, task, where)
    raise DataError(
        f"{where}: field 'question': missing; a row needs 'question', 'choices', 'answer' "
        f"(multiple choice) or 'prompt', 'completion' (free-form); got fields {sorted(row)}"
    )


def _first(row: Mapping, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in row and row[k] is not None), None)


def _text(row: Mapping, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: field '{key}': missing")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}': empty")
    return value


def _task(row: Mapping, where: str) -> str:
    key = _first(row, _TASK_KEYS)
    if key is None:
        return "default"
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}': expected a non-empty string, got {value!r}")
    return value


def _choice_row(row: Mapping, where: str, task: str) -> Example:
    qkey = _first(row, _QUESTION_KEYS) or "question"
    question = _text(row, qkey, where)
    ckey = _first(row, _CHOICES_KEYS)
    if ckey is None:
        raise DataError(f"{where}: field 'choices': missing")
    raw = row[ckey]
    labels: list[str] | None = None
    if isinstance(raw, Mapping) and "text" in raw:  # ARC style {"text": [...], "label": [...]}
        labels = [str(x) for x in raw.get("label") or []] or None
        raw = raw["text"]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: field '{ckey}': expected a list of strings, got a string that is not "
                "a JSON list"
            ) from None
    if not isinstance(raw, (list, tuple)):
        raise DataError(
            f"{where}: field '{ckey}': expected a list of strings, got {type(raw).__name__}"
        )
    if not MIN_CHOICES <= len(raw) <= MAX_CHOICES:
        raise DataError(
            f"{where}: field '{ckey}': {len(raw)} choices, expected {MIN_CHOICES} to {MAX_CHOICES}"
        )
    for i, c in enumerate(raw):
        if not isinstance(c, str) or not c.strip():
            raise DataError(
                f"{where}: field '{ckey}': choice {i} is {c!r}, expected a non-empty string"
            )
    choices = tuple(raw)
    akey = _first(row, _ANSWER_KEYS)
    if akey is None:
        raise DataError(f"{where}: field 'answer': missing")
    answer = _answer_index(row[akey], len(choices), labels, where, akey)
    return Example(question, choices, answer, None, task, where)


def _answer_index(value: Any, n: int, labels: list[str] | None, where: str, key: str) -> int:
    bad = f"{where}: field '{key}': "
    if isinstance(value, bool):
        raise DataError(bad + f"expected an index 0-{n - 1} or a letter, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        v = value.strip()
        if labels and v in labels:
            return labels.index(v)
        if v.isdigit():
            value = int(v)
        elif len(v) == 1 and v.upper() in LETTERS:
            idx = LETTERS.index(v.upper())
            if idx >= n:
                raise DataError(bad + f"letter {v!r} but the row has only {n} choices")
            return idx
        else:
            raise DataError(
                bad + f"expected an index 0-{n - 1} or a letter A-{LETTERS[n - 1]}, got {value!r}"
            )
    if isinstance(value, int):
        if not 0 <= value < n:
            raise DataError(bad + f"index {value} out of range for {n} choices (0-based)")
        return value
    raise DataError(bad + f"expected an index 0-{n - 1} or a letter, got {type(value).__name__}")


# ---------------------------------------------------------------- sources


def _rows(spec: str) -> Iterator[tuple[str, Any]]:
    """Raw rows (``where``, mapping) of one source; lm-eval tasks are read elsewhere."""
    if spec.startswith("hf:"):
        yield from _hf_rows(spec)
        return
    path = Path(spec)
    split = None
    if not path.exists() and ":" in spec:
        head, _, tail = spec.rpartition(":")
        if Path(head).is_dir():
            path, split = Path(head), tail
    if path.is_dir():
        yield from _disk_rows(path, split)
        return
    if not path.is_file():
        raise DataError(f"{spec}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    else:
        raise DataError(
            f"{spec}: unknown data format {suffix or '(no suffix)'}; use .jsonl, .json, .csv, "
            "hf:NAME[:CONFIG]:SPLIT or a datasets folder"
        )


def _need_datasets(spec: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec}: reading datasets needs the 'datasets' package (pip install datasets)"
        ) from None
    return datasets


def _hf_rows(spec: str) -> Iterator[tuple[str, Any]]:
    from tuner.data.spec import split_outside_brackets

    # a split may be a slice with its own colon (test[:100]); split only outside brackets
    parts = split_outside_brackets(spec[3:], ":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{spec}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    datasets = _need_datasets(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"{spec}: could not load the dataset ({type(e).__name__}: {e})") from None
    for n, row in enumerate(ds):
        yield f"{spec}:{n}", row


def _disk_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    datasets = _need_datasets(str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            raise DataError(f"{path}: choose a split as {path}:SPLIT, one of {splits}")
        ds = ds[split]
    elif split is not None:
        raise DataError(f"{path}: holds a single dataset; drop ':{split}'")
    for n, row in enumerate(ds):
        yield f"{path}:{n}", row
