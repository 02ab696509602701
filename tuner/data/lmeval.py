"""lm-evaluation-harness tasks as a data source: ``lm-eval:TASK[:SPLIT][=LOCAL_COPY]``.

Rows come from lm-eval's own task objects (``TaskManager``), so prompts, choices and gold
answers are exactly lm-eval's, with no per-dataset code here:

* ``TASK``: a registered task, group or tag (``hellaswag``, ``arc_challenge``, ``mmlu``,
  ``bigbench_*_multiple_choice``, ``copa``, ...) or the path of a task YAML file of your own.
  A group yields the rows of every task in it, each tagged with its task's name.
* ``SPLIT``: ``train``, ``validation`` or ``test`` (or the split's name in the task's YAML).
  Default: the split lm-eval evaluates (test when the task has one, else validation).
* ``=LOCAL_COPY``: read that split from a local file (``.parquet``, ``.jsonl``/``.json``,
  ``.csv``, ``.arrow``) or ``datasets.save_to_disk`` folder in the dataset's own column
  layout, instead of the task's hub dataset. It writes a task YAML that ``include:``s the
  registered one and overrides only where the data lives, so the task's ``process_docs``,
  prompt and answer functions still apply.

Each document becomes the request lm-eval sends in a zero-shot run (``num_fewshot=0``; the
task's description is kept): a ``multiple_choice`` document gives a row whose prompt is the
context (``fewshot_context``), whose choices are ``doc_to_choice`` and whose continuations
are ``target_delimiter + choice`` (``construct_requests``), with the gold index lm-eval
scores against (``doc_to_target``, a string gold located among the choices). Such rows are
scored by log-likelihood only (``--scoring loglik``), tokenised as lm-eval does
(:mod:`tuner.data.rendered`). A ``generate_until`` document (GSM8K) gives a free-form row:
the context as prompt and ``target_delimiter + doc_to_target`` (the full reference answer)
as completion, which trains the tuner; ``roma-tune eval`` (vLLM backend) generates greedily
with the task's stop strings and judges the text with lm-eval's own answer extraction and
metric (:mod:`tuner.data.lmeval_generate`, kept on the row as ``Example.generation``).
Multiple-input tasks (WinoGrande: ``doc_to_text`` gives the gold index, ``doc_to_choice`` one
context per option, ``doc_to_target`` the continuation they share) give rows whose choices are
the contexts, all scored on the shared continuation (``target_delimiter + doc_to_target``);
the routing vector of such a row is read at the last token of the gold option's context.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.data.lmeval_generate import generation_of
from tuner.data.sources import DataError, Example

PREFIX = "lm-eval:"
ROLES = ("train", "validation", "test")
_ROLE_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
_LOCAL = "data"  # the split name a local copy is read under
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_BUILDERS[".arrow"] = "arrow"
SUPPORTED_OUTPUTS = ("multiple_choice", "generate_until")


@dataclass(frozen=True)
class LmEvalSpec:
    """A parsed ``lm-eval:TASK[:SPLIT][=LOCAL_COPY]``."""

    task: str  # registered name or YAML path
    split: str | None
    local: Path | None


def parse_lmeval_spec(spec: str) -> LmEvalSpec:
    """Parse ``spec``; :class:`DataError` when it is malformed."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    body, eq, local = body.partition("=")
    task, split = body, None
    if not task.endswith((".yaml", ".yml")) and ":" in task:
        task, _, split = task.rpartition(":")
    if not task or split == "" or (eq and not local):
        raise DataError(f"{spec}: expected lm-eval:TASK[:SPLIT][=LOCAL_COPY]")
    return LmEvalSpec(task, split, Path(local).expanduser() if eq else None)


def lmeval_examples(
    spec: str, *, skip_bad_rows: bool = False, limit: int | None = None
) -> tuple[list[Example], int]:
    """(examples, bad documents skipped) of an ``lm-eval:`` spec; see the module docstring."""
    s = parse_lmeval_spec(spec)
    examples: list[Example] = []
    skipped = 0
    with _quiet():
        for name, task in _load_tasks(s, spec).items():
            _check_task(task, name, spec)
            label, docs = _docs(task, s, name, spec)
            for i, doc in enumerate(docs):
                try:
                    examples.append(doc_example(task, doc, f"{PREFIX}{name}:{label}:{i}", name))
                except DataError:
                    if not skip_bad_rows:
                        raise
                    skipped += 1
                    continue
                if limit is not None and len(examples) >= limit:
                    return examples, skipped
    return examples, skipped


def doc_example(task: Any, doc: Any, where: str, name: str) -> Example:
    """One lm-eval document -> :class:`Example` (the zero-shot request lm-eval would send)."""
    delim = task.config.target_delimiter
    try:
        ctx = task.fewshot_context(doc=doc, num_fewshot=0)
        if task.OUTPUT_TYPE == "generate_until":
            target = task.doc_to_target(doc)
            if isinstance(target, list):
                target = target[0] if target else ""
            target = str(target)
            if not ctx or not target.strip():
                raise DataError(f"{where}: empty prompt or answer (doc_to_text/doc_to_target)")
            gen = generation_of(task, doc, ctx, name)
            return Example(ctx, None, None, delim + target, name, where, delim, generation=gen)
        choices = task.doc_to_choice(doc)
        requests = task.construct_requests(doc=doc, ctx=ctx, metadata=(name, 0, 1))
        gold = _gold(task, doc, choices, where)
        shared = None
        if task.multiple_input:  # one context per choice, one continuation for all
            shared = delim + str(task.doc_to_target(doc))
            choices = ctx
    except DataError:
        raise
    except Exception as e:  # lm-eval's functions on a malformed document
        raise DataError(f"{where}: lm-eval could not render the document ({_line(e)})") from None
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: doc_to_choice gave {choices!r}, expected 2 or more strings")
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise DataError(f"{where}: doc_to_choice: choice {i} is {c!r}, expected a string")
    args = [r.arguments for r in (requests if isinstance(requests, list) else [requests])]
    if shared is not None:
        want = [(c, shared) for c in choices]
        prompt = choices[gold]
    else:
        want = [(ctx, delim + c) for c in choices]
        prompt = ctx
    if [tuple(a[:2]) for a in args[: len(choices)]] != want:
        raise DataError(
            f"{where}: the task's requests are not (context, target_delimiter + choice); "
            "its construct_requests is not supported"
        )
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: empty context (doc_to_text)")
    return Example(prompt, tuple(choices), gold, None, name, where, delim, continuation=shared)


def _gold(task: Any, doc: Any, choices: list[str], where: str) -> int:
    """The index lm-eval scores against (``process_results`` of multiple_choice tasks)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        if len(gold) != 1:
            raise DataError(f"{where}: {len(gold)} gold answers; one per row is supported")
        gold = gold[0]
    if isinstance(gold, str):
        if gold not in choices:
            raise DataError(f"{where}: doc_to_target {gold!r} is not one of the choices")
        return choices.index(gold)
    try:
        index = operator.index(gold)
    except TypeError:
        raise DataError(f"{where}: doc_to_target gave {gold!r}, expected an index") from None
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: gold index {index} out of range for {len(choices)} choices")
    return index


def _check_task(task: Any, name: str, spec: str) -> None:
    output = getattr(task, "OUTPUT_TYPE", None)
    if output not in SUPPORTED_OUTPUTS:
        raise DataError(
            f"{spec}: task {name} is a {output} task; lm-eval tasks of type "
            f"{' or '.join(SUPPORTED_OUTPUTS)} are supported"
        )


def _docs(task: Any, s: LmEvalSpec, name: str, spec: str) -> tuple[str, Any]:
    """(split label, processed documents) of the split ``s`` asks for."""
    if s.local is not None:  # every split of the overriding YAML reads the local copy
        return s.split or "local", task.validation_docs()
    cfg = task.config
    if s.split is None:
        role = "test" if task.has_test_docs() else "validation"
    elif s.split in ROLES:
        role = s.split
    else:
        named = {getattr(cfg, key): r for r, key in _ROLE_KEYS.items() if getattr(cfg, key)}
        if s.split not in named:
            raise DataError(f"{spec}: task {name} has no split {s.split!r}; {_splits(task)}")
        role = named[s.split]
    split_name = getattr(cfg, _ROLE_KEYS[role])
    if not split_name:
        raise DataError(f"{spec}: task {name} has no {role} split; {_splits(task)}")
    docs = {"train": task.training_docs, "validation": task.validation_docs}.get(
        role, task.test_docs
    )()
    return split_name, docs


def _splits(task: Any) -> str:
    have = [f"{r} ({getattr(task.config, k)})" for r, k in _ROLE_KEYS.items()]
    have = [h for h, k in zip(have, _ROLE_KEYS.values(), strict=True) if getattr(task.config, k)]
    return "it has " + (", ".join(have) or "none")


# ------------------------------------------------------------------ loading tasks


def _lm_eval(spec: str) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError(
            f"{spec}: reading lm-eval tasks needs lm-eval (pip install 'roma-vllm[lm-eval]')"
        ) from None
    return TaskManager


@functools.lru_cache(maxsize=4)
def task_manager(include: tuple[str, ...] = (), defaults: bool = True) -> Any:
    """A TaskManager over lm-eval's tasks (indexing them takes seconds: built once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _load_tasks(s: LmEvalSpec, spec: str) -> dict[str, Any]:
    _lm_eval(spec)
    is_yaml = s.task.endswith((".yaml", ".yml"))
    if is_yaml and not Path(s.task).is_file():
        raise DataError(f"{spec}: no such task file {s.task}")
    if s.local is None:
        tm = task_manager((str(Path(s.task).parent),), False) if is_yaml else task_manager()
        return _load(tm, str(Path(s.task).resolve()) if is_yaml else s.task, spec)
    if not s.local.exists():
        raise DataError(f"{spec}: no such file or folder {s.local}")
    yaml_path, name = _registered_yaml(s, spec)
    with tempfile.TemporaryDirectory(prefix="roma-lmeval-") as tmp:
        (Path(tmp) / "task.yaml").write_text(_override_yaml(yaml_path, name, s.local, spec))
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=tmp, include_defaults=False)
        return _load(tm, name, spec)


def _registered_yaml(s: LmEvalSpec, spec: str) -> tuple[Path, str]:
    if s.task.endswith((".yaml", ".yml")):
        from lm_eval.tasks._yaml_loader import load_yaml  # the name the YAML defines

        name = load_yaml(s.task, resolve_func=False, recursive=True).get("task")
        if not isinstance(name, str):
            raise DataError(f"{spec}: {s.task} defines no single task ('task:' key)")
        return Path(s.task).resolve(), name
    entry = task_manager().task_index.get(s.task)
    if entry is None:
        raise DataError(f"{spec}: unknown lm-eval task {s.task!r}{_close(s.task)}")
    if entry.yaml_path is None or "TASK" not in str(entry.kind):
        raise DataError(
            f"{spec}: {s.task} is a group or tag; a local copy holds the data of one task "
            "(name one of its tasks)"
        )
    return Path(entry.yaml_path), s.task


def _override_yaml(include: Path, name: str, local: Path, spec: str) -> str:
    import json

    files: Any
    if local.is_dir():
        files = sorted(str(p.resolve()) for p in local.glob("*.arrow"))
        if not files:
            raise DataError(
                f"{spec}: {local} holds no .arrow files; give a datasets.save_to_disk folder "
                "of one split (DIR/SPLIT for a DatasetDict)"
            )
        builder = "arrow"
    else:
        builder = _BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise DataError(
                f"{spec}: unknown data format {local.suffix or '(no suffix)'}; use "
                f"{', '.join(_BUILDERS)} or a datasets.save_to_disk folder"
            )
        files = str(local.resolve())
    splits = "".join(f"{key}: {_LOCAL}\n" for key in (*_ROLE_KEYS.values(), "fewshot_split"))
    # JSON is valid YAML: quoted paths survive any character
    return (
        f"include: {json.dumps(str(include))}\ntask: {json.dumps(name)}\n"
        f"dataset_path: {builder}\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {json.dumps({_LOCAL: files})}\n{splits}"
    )


def _load(tm: Any, name: str, spec: str) -> dict[str, Any]:
    try:
        if hasattr(tm, "load"):  # lm-eval >= 0.4.10
            return dict(tm.load([name])["tasks"])
        return dict(_leaves(tm.load_task_or_group([name])))
    except KeyError:
        raise DataError(f"{spec}: unknown lm-eval task {name!r}{_close(name)}") from None
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{spec}: lm-eval could not load task {name} ({_line(e)}); without the hub, "
            f"read a local copy: lm-eval:{name}:SPLIT=FILE"
        ) from None


def _leaves(nested: dict) -> Iterator[tuple[str, Any]]:
    for key, value in nested.items():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif isinstance(value, tuple):  # (group config, task) in some 0.4 releases
            if value[-1] is not None:
                yield str(key), value[-1]
        else:
            yield str(key), value


def _close(name: str) -> str:
    import difflib

    near = difflib.get_close_matches(name, task_manager().all_tasks, n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO/WARNING logs and datasets' progress bars off while tasks load."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars = datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()
