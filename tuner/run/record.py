"""What a run records about itself: ``config.json`` and the delta file's ``training`` field.

Both say what produced the deltas: the full configuration, the model (architecture,
tuned layers, dtype, devices), the data (path, fingerprint, counts), the versions of the
libraries that matter, and, for the delta file, the per-epoch history and accuracies.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from roma_vllm import __version__
from tuner.config import TuneConfig
from tuner.data.sources import Dataset
from tuner.model.load import TunerModel, describe
from tuner.train.loop import EpochRecord


def versions() -> dict[str, str]:
    import transformers

    return {
        "roma_vllm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def model_info(tm: TunerModel, world_size: int) -> dict[str, Any]:
    """:func:`tuner.model.load.describe` plus the number of data-parallel processes."""
    return {**describe(tm), "world_size": world_size}


def data_info(data: Dataset, val: Dataset | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": data.path,
        "fingerprint": data.fingerprint,
        "examples": len(data),
        "skipped": data.skipped,
        "tasks": data.tasks,
    }
    if len(data.sources) > 1:  # a mixture: rows per source, before and after its cap
        info["sources"] = data.sources
    if val is not None:
        info["val"] = {"path": val.path, "fingerprint": val.fingerprint, "examples": len(val)}
    return info


def run_config(
    cfg: TuneConfig, model: dict[str, Any], data: dict[str, Any], keys: dict[str, str]
) -> dict[str, Any]:
    """The content of ``RUN_DIR/config.json``."""
    return {
        "config": cfg.to_dict(),
        "roma_vllm_version": __version__,
        "model": model,
        "data": data,
        "cache_keys": keys,
    }


def training_record(
    cfg: TuneConfig,
    tm: TunerModel,
    model: dict[str, Any],
    data: dict[str, Any],
    history: list[EpochRecord],
    accuracy: dict[str, float | None],
    successful_before: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The ``training`` field of the delta file's metadata.

    ``accuracy``: ``train_accuracy_before``/``_after`` and ``val_accuracy_before``/``_after``.
    """
    return {
        "method": "roma" if cfg.lam > 0 else "router-tuning",
        "config": cfg.to_dict(),
        "data": data,
        "base_fingerprint": tm.fingerprint,
        "model": model,
        "epochs": [asdict(r) for r in history],
        **accuracy,
        "successful_before": successful_before,
        "versions": versions(),
        "timings": timings,
    }
