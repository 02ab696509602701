"""Training checkpoints: one safetensors file per epoch, never pickle.

``epoch-N.safetensors`` holds everything a resumed run needs to continue exactly where an
uninterrupted run would be: the float32 router masters, AdamW's state, the routing
snapshot and neighbours the next epoch trains against (and the final snapshot after the
last epoch). Tensors are stored under ``routers/NAME``, ``optimizer/PARAM/KEY``,
``snapshot/KEY``, ``neighbours/KEY`` and ``final/KEY``; everything else (epoch, history,
optimiser hyper-parameters) is JSON in the file's metadata, so one file is one consistent
state, written atomically (temp file + rename): a killed run leaves either the previous
checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from roma_vllm._version import __version__
from roma_vllm.deltas import atomic_write
from roma_vllm.errors import RomaError
from tuner.roma.neighbours import Neighbours
from tuner.roma.snapshot import Snapshot

PREFIX = "epoch-"
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"  # roma-vllm 0.1 pickled checkpoints: recognised, never loaded
METADATA_KEY = "roma_checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(rf"{PREFIX}(\d+)({re.escape(SUFFIX)}|{re.escape(LEGACY_SUFFIX)})")


class CheckpointError(RomaError):
    """A checkpoint cannot be read; the message names the file."""


@dataclass
class TrainState:
    """Where training stands after ``epoch``: what a checkpoint holds."""

    epoch: int
    routers: dict[str, torch.Tensor]  # checkpoint name -> float32 master weight
    optimizer: dict[str, Any]  # torch.optim state_dict
    history: list[dict[str, Any]]  # EpochRecord fields, one dict per finished epoch
    snapshot: Snapshot  # the successful set and routing the next epoch aligns to
    neighbours: Neighbours
    final: Snapshot | None = None  # after the last epoch: the final measurement


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"{PREFIX}{epoch}{SUFFIX}"


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint file name stands for (``epoch-3.safetensors`` -> 3)."""
    m = _NAME.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint name")
    return int(m.group(1))


def _found(directory: Path, suffix: str) -> list[Path]:
    return sorted(
        (p for p in Path(directory).glob(f"{PREFIX}*{suffix}") if _NAME.fullmatch(p.name)),
        key=checkpoint_epoch,
    )


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint of the latest finished epoch in ``directory``, if any."""
    found = _found(directory, SUFFIX) if Path(directory).is_dir() else []
    return found[-1] if found else None


def legacy_checkpoints(directory: Path) -> list[Path]:
    """Pickled ``epoch-N.pt`` files of roma-vllm 0.1, which are never loaded."""
    return _found(directory, LEGACY_SUFFIX) if Path(directory).is_dir() else []


def all_checkpoints(directory: Path) -> list[Path]:
    """Every checkpoint file in ``directory`` (both formats)."""
    return legacy_checkpoints(directory) + _found(directory, SUFFIX)


def _flat(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(directory: Path, state: TrainState) -> Path:
    """Write ``state`` to ``epoch-N.safetensors`` atomically; returns the path."""
    tensors = _flat("routers", state.routers)
    tensors |= _flat("snapshot", state.snapshot.tensors())
    nb = {k: torch.from_numpy(v) for k, v in state.neighbours.arrays().items()}
    tensors |= _flat("neighbours", nb)
    if state.final is not None:
        tensors |= _flat("final", state.final.tensors())
    other: dict[str, dict[str, Any]] = {}  # non-tensor optimiser state, rare
    for param, values in state.optimizer["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{param}/{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                other.setdefault(str(param), {})[key] = value
    meta = {
        "format_version": FORMAT_VERSION,
        "roma_vllm_version": __version__,
        "epoch": state.epoch,
        "history": state.history,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "other": other},
        "final": state.final is not None,
    }
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    path = checkpoint_path(directory, state.epoch)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: Path) -> TrainState:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable roma-tune checkpoint ({e}); pass --overwrite to delete "
            "this configuration's checkpoints and train again"
        ) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')!r}, this roma-vllm reads "
            f"{FORMAT_VERSION}; pass --overwrite to train again"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        group, _, name = key.partition("/")
        parts.setdefault(group, {})[name] = tensor
    opt_state: dict[int, dict[str, Any]] = {}
    for name, tensor in parts.get("optimizer", {}).items():
        param, _, key = name.partition("/")
        opt_state.setdefault(int(param), {})[key] = tensor
    for param, values in meta["optimizer"]["other"].items():
        opt_state.setdefault(int(param), {}).update(values)
    groups = meta["optimizer"]["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        g.update({k: tuple(v) for k, v in g.items() if k != "params" and isinstance(v, list)})
    nb = parts["neighbours"]
    return TrainState(
        epoch=int(meta["epoch"]),
        routers=parts["routers"],
        optimizer={"state": opt_state, "param_groups": groups},
        history=meta["history"],
        snapshot=Snapshot.from_tensors(parts["snapshot"]),
        neighbours=Neighbours(nb["index"].numpy(), nb["weight"].numpy(), nb["distance"].numpy()),
        final=Snapshot.from_tensors(parts["final"]) if meta["final"] else None,
    )
