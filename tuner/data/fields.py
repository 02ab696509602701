"""Column mappings: read rows whose columns have other names than the tuner's.

A mapping names the column of each field, comma-separated::

    question=goal,choices=sol1|sol2,answer=label,answer-base=1

* ``question``, ``answer``, ``task``, ``prompt``, ``completion``: one column each;
* ``choices``: one column holding a list (or ARC's ``{"text": [...], "label": [...]}``), or
  several columns joined by ``|``, one choice each, in that order;
* ``answer-base``: ``0`` (default) or ``1``: an integer answer (or digit string) counts from
  this number, so ``answer-base=1`` turns SocialIQA's / WinoGrande's "1", "2", "3" into choice
  0, 1, 2. A letter answer (``A``..``J``) is a letter in either base, and a boolean answer
  (BoolQ's ``label``) counts as ``false`` = 0, ``true`` = 1 (base 0 only).

Fields left unmapped are read under their usual names (``question``, ``choices`` ...). The
mapped columns are written under the canonical names, then the row is checked as any other
(:func:`tuner.data.sources.parse_row`), so errors name the mapped field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuner.data.sources import (
    _ANSWER_KEYS,
    _CHOICES_KEYS,
    _QUESTION_KEYS,
    _TASK_KEYS,
    DataError,
)

SINGLE = ("question", "answer", "task", "prompt", "completion")
KEYS = (*SINGLE, "choices", "answer-base")
# the aliases a mapped field replaces: a row has one source for each field
_ALIASES = {
    "question": _QUESTION_KEYS,
    "choices": _CHOICES_KEYS,
    "answer": _ANSWER_KEYS,
    "task": _TASK_KEYS,
    "prompt": ("prompt",),
    "completion": ("completion",),
}


@dataclass(frozen=True)
class FieldMap:
    """Which column holds each field; see the module docstring."""

    columns: dict[str, str]  # field -> column, for the single-column fields
    choices: tuple[str, ...] | None  # one list column, or one column per choice
    answer_base: int = 0

    @classmethod
    def parse(cls, text: str, where: str = "--fields") -> FieldMap:
        """Parse ``question=goal,choices=sol1|sol2,...``; :class:`DataError` on a bad entry."""
        columns: dict[str, str] = {}
        choices: tuple[str, ...] | None = None
        base = 0
        for item in text.split(","):
            item = item.strip()
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise DataError(f"{where}: '{item}': expected FIELD=COLUMN, e.g. question=goal")
            if key not in KEYS:
                raise DataError(f"{where}: unknown field '{key}'; use {', '.join(KEYS)}")
            if key in columns or (key == "choices" and choices is not None):
                raise DataError(f"{where}: field '{key}' is mapped twice")
            if key == "answer-base":
                if value not in ("0", "1"):
                    raise DataError(f"{where}: answer-base must be 0 or 1, got {value!r}")
                base = int(value)
            elif key == "choices":
                choices = tuple(c.strip() for c in value.split("|"))
                if not all(choices):
                    raise DataError(f"{where}: choices={value}: an empty column name")
            else:
                columns[key] = value
        choice_kind = bool({"question", "answer"} & set(columns)) or choices is not None
        if choice_kind and {"prompt", "completion"} & set(columns):
            raise DataError(
                f"{where}: map either question/choices/answer (multiple choice) or "
                "prompt/completion (free-form), not both"
            )
        return cls(columns, choices, base)

    def apply(self, row: Mapping[str, Any], where: str) -> dict[str, Any]:
        """``row`` with the mapped columns under the canonical field names."""
        mapped = set(self.columns) | ({"choices"} if self.choices else set())
        if mapped & {"question", "choices", "answer"}:
            mapped |= {"prompt", "completion"}  # the mapping decides the row's kind
        elif mapped & {"prompt", "completion"}:
            mapped |= {"question", "choices"}
        drop = {alias for f in mapped for alias in _ALIASES[f]}
        out = {k: v for k, v in row.items() if k not in drop}
        for name, column in self.columns.items():
            out[name] = self._get(row, column, name, where)
        if self.choices is not None:
            if len(self.choices) == 1:
                out["choices"] = self._get(row, self.choices[0], "choices", where)
            else:
                out["choices"] = [self._get(row, c, "choices", where) for c in self.choices]
        if "answer" in self.columns:
            out["answer"] = self._answer(out["answer"], where)
        return out

    @staticmethod
    def _get(row: Mapping[str, Any], column: str, name: str, where: str) -> Any:
        if column not in row:
            raise DataError(
                f"{where}: column '{column}' (mapped to {name}): missing; the row has {sorted(row)}"
            )
        return row[column]

    def _answer(self, value: Any, where: str) -> Any:
        column = self.columns["answer"]
        bad = f"{where}: field '{column}' (answer, answer-base={self.answer_base}): "
        if isinstance(value, bool):
            if self.answer_base == 1:
                raise DataError(bad + f"a boolean answer ({value}) has no 1-based index")
            return int(value)
        if self.answer_base == 0:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, int):
            if value < 1:
                raise DataError(bad + f"{value} is not a 1-based index")
            return value - 1
        return value  # a letter, or something parse_row reports
