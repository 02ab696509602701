"""Accuracy at served precision: the tuned routers rounded to the checkpoint's dtype.

Training keeps float32 router masters, so ``tuned - base`` is exact; vLLM (and
``roma-tune merge``) hold the routers in the checkpoint's dtype, bf16 for real models, where
a small delta can round away. After training the run measures accuracy once more with the
routers rounded to that dtype (and back), so the table and the delta metadata show what is
actually served next to the float32 figures. A float32 checkpoint rounds nothing: its
served figures are the float32 ones, without another pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuner.model.dtypes import DTYPES, checkpoint_dtype
from tuner.model.load import TunerModel
from tuner.roma.snapshot import Snapshot

Measure = Callable[[str], Snapshot]


def served_accuracy(
    tm: TunerModel,
    measure_train: Measure,
    measure_val: Measure | None,
    fp32: dict[str, float | None],
) -> dict[str, Any]:
    """``served_dtype`` and train/val accuracy with the routers rounded to it.

    ``measure_train(description)`` / ``measure_val`` score the training / validation rows
    with the model's current routers; ``fp32`` holds the float32 figures
    (``train_accuracy_after``, ``val_accuracy_after``), reused when the checkpoint is float32.
    """
    served = checkpoint_dtype(tm.checkpoint)
    if served == "float32":
        return {
            "served_dtype": served,
            "train_accuracy_served": fp32["train_accuracy_after"],
            "val_accuracy_served": fp32["val_accuracy_after"],
        }
    exact = tm.router_state()
    tm.load_router_state({n: t.to(DTYPES[served]).float() for n, t in exact.items()})
    try:
        train_acc = measure_train(f"train accuracy, {served} routers").accuracy
        val_acc = measure_val(f"validation, {served} routers").accuracy if measure_val else None
    finally:
        tm.load_router_state(exact)
    return {
        "served_dtype": served,
        "train_accuracy_served": train_acc,
        "val_accuracy_served": val_acc,
    }
