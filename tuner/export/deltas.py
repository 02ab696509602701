"""Outputs of a run, all written atomically: the delta file, config.json and the training log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from roma_vllm.deltas import DELTAS_FILENAME, RouterDeltas, atomic_write, make_deltas, write_deltas
from tuner.model.load import TunerModel

CONFIG_FILENAME = "config.json"
LOG_FILENAME = "train_log.jsonl"


def write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_log(path: Path, events: list[dict[str, Any]]) -> Path:
    """The training log: one JSON object per line, rewritten atomically."""
    text = "".join(json.dumps(e, sort_keys=True, default=str) + "\n" for e in events)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def build_deltas(tm: TunerModel, training: dict[str, Any]) -> RouterDeltas:
    """``tuned - base`` (float32) for exactly the tuned routers (weight, and bias where any).

    The base is the checkpoint's stored tensors, the tuned values the float32 masters.
    """
    return make_deltas(tm.base, tm.router_state(), tm.architecture, tm.name, training)


def export_deltas(tm: TunerModel, run_dir: Path, training: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/roma_deltas.safetensors``; returns its path."""
    return write_deltas(Path(run_dir) / DELTAS_FILENAME, build_deltas(tm, training))
