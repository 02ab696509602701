"""Synthetic multiple-choice task families for pretraining a small MoE and benchmarking RoMA.

Eight families (arithmetic mod 7, largest/smallest, next term of a sequence, a fixed table
of made-up facts, word category, k-th letter, letter offsets, letter counting), each with
its own phrasing templates. Pretraining and the downstream splits use *disjoint* template
sets, so the pretrained routing was never fitted to the downstream prompts.

Rows follow the tuner's schema: ``{"question", "choices", "answer", "task"}``. Every choice
is one lower-case word (a number, a letter or a vocabulary word), hence a single token of
the word-level tokenizer that ``bench.synthetic.pretrain`` builds: ``loglik`` scoring then
costs one forward pass and is the "cloze" style that trains on this machine.

    python -m bench.synthetic.tasks --out DIR --seed 0
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from bench.common import write_text
from bench.synthetic.families import (
    FAMILIES,
    FAMILY_NAMES,
    N_CHOICES,
    Family,
    facts_table,
    vocabulary,
    words,
)

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "N_CHOICES",
    "SPLITS",
    "Family",
    "Row",
    "downstream_splits",
    "facts_table",
    "generate",
    "make_row",
    "pretrain_rows",
    "read_jsonl",
    "vocabulary",
    "words",
    "write_jsonl",
]

SPLITS = ("train", "val", "test")
Row = dict  # {"question": str, "choices": list[str], "answer": int, "task": str}


def make_row(family: Family, rng: random.Random, templates: tuple[str, ...]) -> Row:
    """One row of ``family``, phrased with a template drawn from ``templates``."""
    fields, choices, answer = family.sample(rng)
    question = rng.choice(templates).format(**fields)
    return {"question": question, "choices": choices, "answer": answer, "task": family.name}


def pretrain_rows(n: int, seed: int) -> list[Row]:
    """``n`` rows in the pretraining phrasings, families interleaved round-robin."""
    rng = random.Random(f"pretrain-{seed}")
    return [
        make_row(FAMILIES[i % len(FAMILIES)], rng, FAMILIES[i % len(FAMILIES)].pretrain)
        for i in range(n)
    ]


def downstream_splits(
    seed: int, n_train: int = 400, n_val: int = 50, n_test: int = 50
) -> dict[str, list[Row]]:
    """Train / val / test rows per family in the downstream phrasings.

    Question texts are unique across all three splits, so the splits are disjoint. Every
    family gets exactly ``n_val`` and ``n_test`` rows and *up to* ``n_train`` train rows: a
    family with fewer distinct questions (``facts`` has 288, ``letter_step`` 432) gives
    train what is left. Raises ``ValueError`` when a family cannot fill val and test.
    """
    rng = random.Random(f"downstream-{seed}")
    need = n_train + n_val + n_test
    splits: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for family in FAMILIES:
        rows: dict[str, Row] = {}
        for _ in range(need * 50):
            if len(rows) == need:
                break
            row = make_row(family, rng, family.downstream)
            rows.setdefault(row["question"], row)
        if len(rows) < n_val + n_test:
            raise ValueError(
                f"task {family.name!r}: only {len(rows)} distinct questions, "
                f"{n_val + n_test} asked for val + test; lower --n-val/--n-test"
            )
        ordered = list(rows.values())
        splits["val"] += ordered[:n_val]
        splits["test"] += ordered[n_val : n_val + n_test]
        splits["train"] += ordered[n_val + n_test :]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """Write ``rows`` to ``path``, one JSON object per line, atomically."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[Row]:
    """Read a JSONL file of rows."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(
    out: Path,
    seed: int = 0,
    n_pretrain: int = 120_000,
    n_train: int = 400,
    n_val: int = 50,
    n_test: int = 50,
) -> dict[str, int]:
    """Write ``pretrain.jsonl`` and the downstream ``train/val/test.jsonl`` under ``out``.

    Returns the number of rows written per file stem.
    """
    out = Path(out)
    files = {"pretrain": pretrain_rows(n_pretrain, seed)}
    files.update(downstream_splits(seed, n_train, n_val, n_test))
    for name, rows in files.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    return {name: len(rows) for name, rows in files.items()}


app = typer.Typer(add_completion=False)


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Folder for pretrain/train/val/test.jsonl.")],
    seed: Annotated[int, typer.Option(help="Data seed; the same seed writes identical files.")] = 0,
    n_pretrain: Annotated[int, typer.Option(help="Pretraining rows (all families).")] = 120_000,
    n_train: Annotated[
        int, typer.Option(help="Downstream train rows per family (at most: see facts).")
    ] = 400,
    n_val: Annotated[int, typer.Option(help="Downstream validation rows per family.")] = 50,
    n_test: Annotated[int, typer.Option(help="Downstream test rows per family.")] = 50,
) -> None:
    """Generate the synthetic pretraining data and downstream splits."""
    counts = generate(out, seed, n_pretrain, n_train, n_val, n_test)
    for name, n in counts.items():
        typer.echo(f"{out / (name + '.jsonl')}: {n} rows")
    per_task = Counter(r["task"] for r in read_jsonl(out / "train.jsonl"))
    for task, n in sorted(per_task.items()):
        if n < n_train:
            typer.echo(f"  train: task {task!r} has {n} rows (all its distinct questions left)")


if __name__ == "__main__":
    app()
