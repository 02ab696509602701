"""Local data files -> raw rows, each with the ``FILE:LINE`` it came from.

Readers for ``.jsonl``/``.ndjson``, ``.json`` and ``.csv`` (:mod:`tuner.data.sources`
dispatches to them and checks the rows). Whatever the bytes, a reader either yields rows or
stops with one :class:`~tuner.data.sources.DataError` line naming the file (and line); a
row that cannot be decoded is yielded as :class:`Unparsable`, so ``--skip-bad-rows`` can
count it. Refused, because the row would be ambiguous or not JSON:

* invalid UTF-8 (the line is named), JSON nested deeper than Python's recursion limit;
* a key that appears twice in one JSON object (which value is meant?), or a CSV header that
  names a column twice;
* ``NaN``, ``Infinity`` and ``-Infinity`` as a value (Python writes them, JSON has no such
  numbers); write a number or ``null``;
* a CSV row with more or fewer cells than the header has columns.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Unparsable(dict):
    """A row that could not be decoded; parse_row reports it."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class _NonFinite:
    """What JSON's non-standard ``NaN``/``Infinity`` parse to, so the owning key is named."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _error(message: str) -> Exception:
    from tuner.data.sources import DataError  # sources imports this module

    return DataError(message)


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, or :class:`Unparsable` when a key repeats or a value is NaN/Infinity."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            return Unparsable(f"field '{key}': appears twice in one object (which one is meant?)")
        if isinstance(value, Unparsable):  # a nested object with the problem
            return value
        items = value if isinstance(value, list) else [value]
        bad = next((v for v in items if isinstance(v, _NonFinite)), None)
        if bad is not None:
            return Unparsable(f"field '{key}': {bad.name} is not a JSON number; write a number")
        out[key] = value
    return out


class NotJson(ValueError):
    """Text that is not JSON: ``msg`` is one line, ``lineno`` the line (when known)."""

    def __init__(self, msg: str, lineno: int | None = None) -> None:
        super().__init__(msg)
        self.msg, self.lineno = msg, lineno


def loads_strict(text: str) -> Any:
    """``json.loads`` with the refusals of this module's docstring (``Unparsable`` objects);
    :class:`NotJson` for text that is not JSON at all."""
    try:
        value = json.loads(text, object_pairs_hook=_strict_object, parse_constant=_NonFinite)
    except json.JSONDecodeError as e:
        raise NotJson(f"not valid JSON ({e.msg})", e.lineno) from None
    except RecursionError:
        raise NotJson("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise NotJson(f"not valid JSON ({e})") from None
    if isinstance(value, _NonFinite):
        return Unparsable(f"{value.name} is not a JSON number")
    return value


def _open(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as e:
        raise _error(f"{path}: cannot read ({e.strerror or e})") from None


def _read_text(path: Path) -> str:
    """The whole file as text; invalid UTF-8 is refused naming its line."""
    with _open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _error(f"{path}:{line}: not valid UTF-8 (byte {e.start + 1} of the file)") from None
    return text.removeprefix("\ufeff")


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """One JSON object per line; blank lines are skipped."""
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, Unparsable(f"not valid UTF-8 (byte {e.start + 1} of the line)")
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                row = loads_strict(line)
            except NotJson as e:
                row = Unparsable(e.msg)
            yield where, row


def json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON list of rows, or an object holding one list; the "line" is the row number."""
    text = _read_text(path)
    try:
        data = loads_strict(text)
    except NotJson as e:
        raise _error(f"{path}{f':{e.lineno}' if e.lineno else ''}: {e.msg}") from None
    if isinstance(data, Unparsable):
        raise _error(f"{path}: {data.reason}")
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise _error(f"{path}: expected a JSON list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise _error(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    # JSON arrays have no line per row; the position is the row number (1-based).
    for n, row in enumerate(data, 1):
        yield f"{path}:{n}", row


def csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A header row, then one row per record; choices as a JSON list or one column each."""
    from tuner.data.sources import _CHOICES_KEYS

    text = _read_text(path)
    nul = text.find("\x00")
    if nul >= 0:  # csv refuses it before Python 3.11 and keeps it after: refused everywhere
        raise _error(f"{path}:{text.count(chr(10), 0, nul) + 1}: not valid CSV (a NUL byte)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    line = 0  # the last line of the last complete record
    try:
        fields = list(reader.fieldnames or [])
        twice = next((c for c in fields if fields.count(c) > 1), None)
        if twice is not None:
            raise _error(f"{path}:1: column '{twice}' appears twice in the header")
        choice_cols = csv_choice_columns(fields)
        line = reader.line_num
        for raw in reader:
            where = f"{path}:{line + 1}"
            line = reader.line_num
            cells = len(fields) + len(raw.get(None) or []) - sum(v is None for v in raw.values())
            if cells != len(fields):
                yield where, Unparsable(f"{cells} cells, but the header has {len(fields)} columns")
                continue
            row: dict[str, Any] = {k: v for k, v in raw.items() if k is not None and v != ""}
            if choice_cols and not any(k in row for k in _CHOICES_KEYS):
                row["choices"] = [raw[c] for c in choice_cols if raw.get(c, "") != ""]
            yield where, row
    except csv.Error as e:  # named by the line its record starts on
        raise _error(f"{path}:{line + 1}: not valid CSV ({e})") from None


def csv_choice_columns(fields: list[str]) -> list[str]:
    """Choice columns of a CSV header: ``A``..``J``, ``choice1``.. or ``option_a``.."""
    from tuner.data.sources import LETTERS, MIN_CHOICES

    for cols in (
        [c for c in LETTERS if c in fields],
        [f"choice{i}" for i in range(1, 11) if f"choice{i}" in fields],
        [f"option_{c.lower()}" for c in LETTERS if f"option_{c.lower()}" in fields],
    ):
        if len(cols) >= MIN_CHOICES:
            return cols
    return []
