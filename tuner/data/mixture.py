"""Load a spec's sources and mix them into one dataset (the paper trains on 8 sources).

* Sources are read in the order written; rows keep their order within a source.
* In a mixture of two or more sources, a row without a ``task`` is tagged with its source's
  name (:func:`tuner.data.spec.source_name`), so per-task reports separate the sources;
  lm-eval rows always carry their lm-eval task name.
* ``SOURCE@N`` keeps ``N`` rows of that source, drawn without replacement by a generator seeded
  with ``seed`` and the source's text (the same spec and seed keep the same rows), in their
  original order. A source with fewer rows keeps them all.
* ``limit`` then keeps the first rows of the whole mixture.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace

from tuner.data.sources import (
    DataError,
    Dataset,
    Example,
    _rows,
    _Unparsable,
    fingerprint_examples,
    parse_row,
)
from tuner.data.spec import SourceSpec, parse_spec, source_name

LMEVAL_PREFIX = "lm-eval:"


def load_mixture(
    spec: str, *, skip_bad_rows: bool = False, limit: int | None = None, seed: int = 0
) -> Dataset:
    """The rows of every source of ``spec``; see the module docstring."""
    if limit is not None and limit < 1:
        raise DataError(f"{spec}: limit must be at least 1, got {limit}")
    sources = parse_spec(spec)
    several = len(sources) > 1
    names = _unique_names(sources)
    examples: list[Example] = []
    infos = []
    skipped = 0
    for src, name in zip(sources, names, strict=True):
        # one source without a cap stops reading at the limit
        early = limit if not several and src.cap is None else None
        rows, bad = load_source(src, skip_bad_rows=skip_bad_rows, limit=early)
        available = len(rows)
        if src.cap is not None and src.cap < len(rows):
            rng = random.Random(f"{seed}\x1f{src.text}")
            keep = sorted(rng.sample(range(len(rows)), src.cap))
            rows = [rows[i] for i in keep]
        if several:
            rows = [replace(e, task=name) if e.task == "default" else e for e in rows]
        examples += rows
        skipped += bad
        infos.append(
            {
                "name": name,
                "spec": src.text,
                "rows": len(rows),
                "available": available,
                "skipped": bad,
                "tasks": sorted({e.task for e in rows}),
            }
        )
    if limit is not None:
        examples = examples[:limit]
    return Dataset(examples, skipped, fingerprint_examples(examples), spec, infos)


def load_source(
    src: SourceSpec, *, skip_bad_rows: bool = False, limit: int | None = None
) -> tuple[list[Example], int]:
    """(examples, bad rows skipped) of one source; :class:`DataError` when none is usable."""
    if src.source.startswith(LMEVAL_PREFIX):
        if src.fields is not None:
            raise DataError(
                f"{src.text}: a column mapping does not apply to lm-eval tasks (the task's "
                "own definition reads the columns)"
            )
        from tuner.data.lmeval import lmeval_examples

        examples, skipped = lmeval_examples(src.source, skip_bad_rows=skip_bad_rows, limit=limit)
    else:
        examples, skipped = _file_examples(src, skip_bad_rows, limit)
    if not examples:
        detail = f" ({skipped} bad rows skipped)" if skipped else ""
        raise DataError(
            f"{src.text}: no usable rows{detail}; see the row format in `roma-tune run --help`"
        )
    return examples, skipped


def _file_examples(
    src: SourceSpec, skip_bad_rows: bool, limit: int | None
) -> tuple[list[Example], int]:
    fmap = None
    if src.fields is not None:
        from tuner.data.fields import FieldMap

        fmap = FieldMap.parse(src.fields, f"{src.text}: mapping")
    examples: list[Example] = []
    skipped = 0
    for where, row in _rows(src.source):
        try:
            if fmap is not None and isinstance(row, Mapping) and not isinstance(row, _Unparsable):
                row = fmap.apply(row, where)
            examples.append(parse_row(row, where))
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        if limit is not None and len(examples) >= limit:
            break
    return examples, skipped


def _unique_names(sources: list[SourceSpec]) -> list[str]:
    names = [source_name(s.source) for s in sources]
    return [n if names.count(n) == 1 else s.source for n, s in zip(names, sources, strict=True)]
