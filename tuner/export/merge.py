"""`roma-tune merge`: a full Hugging Face checkpoint with the tuned routers baked in.

For engines without the roma plugin. The output folder is the base checkpoint with every
router named in the delta file replaced by ``base + scale * delta`` (float32 add, cast back
to the stored dtype, :func:`roma_vllm.deltas.add_delta`, exactly what the plugin and
in-memory application compute). Everything else is kept: config, tokenizer and other files
are copied, shards without routers are copied byte for byte, shards with routers are
rewritten with the same tensor names, dtypes and safetensors metadata, so the index file
stays valid. The deltas must have been made from this base (fingerprints checked).

The folder is assembled under a temporary name beside ``out``, every file in it synced to
disk, and renamed into place at the end (the parent folder synced after): an interrupted
merge, or a power loss, never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from roma_vllm import __version__
from roma_vllm.architectures import architecture_of
from roma_vllm.checkpoint import (
    checkpoint_shapes,
    checkpoint_tensors,
    load_config,
    resolve_checkpoint,
    safetensors_files,
)
from roma_vllm.deltas import (
    DeltaError,
    RouterDeltas,
    add_delta,
    check_base_tensor,
    fsync_dir,
    fsync_path,
    read_deltas,
)
from roma_vllm.errors import RomaError

MERGE_RECORD = "roma_merge.json"  # written beside the merged weights: what produced them


class MergeError(RomaError, ValueError):
    """The merge cannot run; the message names the folder or flag."""


def check_against_checkpoint(
    checkpoint: Path, deltas: RouterDeltas, where: str, allow_mismatch: bool = False
) -> dict[str, torch.Tensor]:
    """Refuse deltas that do not fit ``checkpoint``; return its stored base routers.

    Checks the architecture, that every delta tensor exists in the checkpoint with the same
    shape, and (unless ``allow_mismatch``) that the base fingerprints match.
    """
    arch = architecture_of(load_config(checkpoint))
    if arch != deltas.architecture:
        raise DeltaError(
            f"{where}: deltas are for {deltas.architecture} but {checkpoint} is {arch}"
        )
    shapes = checkpoint_shapes(checkpoint)
    missing = sorted(n for n in deltas.tensors if n not in shapes)
    if missing:
        raise DeltaError(
            f"{where}: tensor '{missing[0]}' is not in checkpoint {checkpoint}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    base = checkpoint_tensors(checkpoint, list(deltas.tensors))
    for name, tensor in base.items():
        check_base_tensor(deltas, name, tensor, where, allow_mismatch)
    return base


def _rewrite_shard(src: Path, dst: Path, deltas: RouterDeltas, scale: float) -> list[str]:
    """Copy shard ``src`` to ``dst`` with its routers replaced; the names replaced."""
    with safe_open(str(src), framework="pt") as f:
        names = list(f.keys())  # noqa: SIM118
        hits = [n for n in names if n in deltas.tensors]
        if not hits:
            shutil.copy2(src, dst)
            return []
        metadata = f.metadata()
        tensors = {n: f.get_tensor(n) for n in names}
    for n in hits:
        tensors[n] = add_delta(tensors[n], deltas.tensors[n], scale).contiguous()
    save_file(tensors, str(dst), metadata=metadata)
    return hits


# Pickled weights beside the safetensors shards would hold the unmerged routers: not copied.
_STALE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth")


def _copy_other_files(src: Path, dst: Path) -> None:
    """Everything in the checkpoint folder but its weights (config, tokenizer, ...)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0].startswith(".") or rel.parts[0] == MERGE_RECORD:
            continue
        if len(rel.parts) == 1 and (
            path.suffix == ".safetensors" or any(path.match(p) for p in _STALE_WEIGHTS)
        ):
            continue
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def merge(
    model: str,
    deltas_path: str,
    out: str,
    scale: float = 1.0,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``model`` with ``deltas`` merged to folder ``out``; returns the merge record."""
    checkpoint = resolve_checkpoint(model)
    deltas = read_deltas(deltas_path)
    out_dir = Path(out)
    if out_dir.resolve() == checkpoint.resolve():
        raise MergeError(f"--out {out}: is the base checkpoint itself; choose a new folder")
    if out_dir.exists() and not overwrite:
        raise MergeError(f"--out {out}: already exists; choose a new folder or pass --overwrite")
    check_against_checkpoint(checkpoint, deltas, str(deltas_path), allow_mismatch)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _copy_other_files(checkpoint, tmp)
        replaced: dict[str, str] = {}
        for shard in safetensors_files(checkpoint):
            for name in _rewrite_shard(shard, tmp / shard.name, deltas, scale):
                replaced[name] = shard.name
            if progress is not None:
                progress(shard.name)
        unmatched = sorted(set(deltas.tensors) - set(replaced))
        if unmatched:  # names were checked above; this guards against odd shard layouts
            raise MergeError(f"{deltas_path}: tensors {unmatched} matched no shard of {model}")
        record = {
            "roma_vllm_version": __version__,
            "base_model": str(model),
            "base_checkpoint": str(checkpoint),
            "deltas": str(deltas_path),
            "scale": scale,
            "allow_mismatch": allow_mismatch,
            "replaced": dict(sorted(replaced.items())),
            "deltas_metadata": deltas.metadata(),
        }
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an existing folder only once ``tmp`` is whole."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private (0700); a checkpoint is not
    # the files' data must be on disk before the rename is: else a power loss can leave
    # the folder under its final name with empty shards
    for folder, _, files in os.walk(tmp):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_dir(folder)
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.rmdir(old)
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def main(
    model: str,
    deltas: str,
    out: str,
    scale: float = 1.0,
    allow_mismatch: bool = False,
    overwrite: bool = False,
) -> None:
    """The `roma-tune merge` command."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not math.isfinite(scale):
        raise MergeError(f"--scale: must be a finite number, got {scale}")
    console = Console(stderr=True)
    shards = len(safetensors_files(resolve_checkpoint(model)))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("merging shards", total=shards)
        record = merge(
            model,
            deltas,
            out,
            scale,
            allow_mismatch,
            overwrite,
            progress=lambda name: bar.advance(task),
        )
    layers = record["deltas_metadata"]["layers"]
    console.print(
        f"merged {len(record['replaced'])} router tensors (layers {layers}, scale {scale:g}) "
        f"into {out}"
    )
