"""`roma-tune run` end to end: data -> embeddings -> snapshot -> neighbours -> training -> export.

The pieces, each in its own module:

* :mod:`tuner.run.stages`: the stages before training (:class:`Stages`), what they echo and log;
* :mod:`tuner.run.stage_cache`: each stage's output cached under ``RUN_DIR/cache`` in a file
  named by a hash of everything it depends on, reused when that file exists;
* :mod:`tuner.run.workdir`: the run directory's lock (one run at a time), the checkpoint
  policy (``RUN_DIR/checkpoints/<hash>``: a finished training is reused, an unfinished one
  continued with ``--resume`` or deleted with ``--overwrite``, never silently) and the
  clean-up of partial files a killed run left;
* :mod:`tuner.run.ranks`: who does what under torchrun;
* :mod:`tuner.run.record`: what ``config.json`` and the delta file record about the run.

This module runs them in order, then the training and the export. Every file is written
atomically (temp file + rename).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roma_vllm.deltas import DELTAS_FILENAME
from tuner.config import TuneConfig
from tuner.export.deltas import export_deltas
from tuner.progress import Bars
from tuner.run import record
from tuner.run.served import served_accuracy
from tuner.run.stages import NoSuccessError, Stages
from tuner.train.determinism import deterministic
from tuner.train.distributed import barrier, shutdown
from tuner.train.loop import EpochRecord, train

__all__ = ["NoSuccessError", "Pipeline", "RunResult", "Stages", "run"]


@dataclass
class RunResult:
    run_dir: Path
    deltas: Path
    accuracy_before: float
    accuracy_after: float
    val_before: float | None
    val_after: float | None
    history: list[EpochRecord]
    reused: list[str] = field(default_factory=list)  # stages taken from the cache
    served: dict[str, Any] = field(default_factory=dict)  # accuracy with routers as served
    truncated: int = 0  # training prompts cut by --max-length


class Pipeline(Stages):
    """One run: the stages in order, then the training and the export."""

    def run(self, on_epoch_end: Callable[[int], None] | None = None) -> RunResult:
        try:
            with deterministic(self.cfg.deterministic):
                return self._run(on_epoch_end)
        finally:
            self.lock.release()
            shutdown(self.dist)

    def _run(self, on_epoch_end: Callable[[int], None] | None) -> RunResult:
        cfg = self.cfg
        self.load()
        emb = self.embeddings()
        prefix = self.prefix()
        snap = self.snapshot(prefix)
        neighbours = self.neighbours(emb, snap)
        val_before = (
            self.measure(self.val_encoded, "validation").accuracy if self.val_encoded else None
        )
        plan = self.checkpoints
        if plan.complete:
            self.reused.append("training")
        validate = (
            (lambda: self.measure(self.val_encoded, "validation").accuracy)
            if self.val_encoded
            else None
        )
        t0 = time.perf_counter()
        result = train(
            self.tm,
            self.encoded,
            cfg,
            snap,
            self.neighbours_for(emb),
            lambda: self.measure(self.encoded, "train accuracy", prefix),
            plan.directory,
            resume=plan.resume,
            neighbours=neighbours,
            prefix=prefix,
            validate=validate,
            bars=self.bars,
            log=self.log,
            on_epoch_end=on_epoch_end,
            dist=self.dist,
        )
        if not plan.complete:
            self._timed("training", t0)
        final = result.final
        assert final is not None
        val_after = result.history[-1].val_accuracy if result.history else None
        accuracy = {
            "train_accuracy_before": snap.accuracy,
            "train_accuracy_after": final.accuracy,
            "val_accuracy_before": val_before,
            "val_accuracy_after": val_after,
        }
        val_enc = self.val_encoded
        accuracy.update(
            served_accuracy(
                self.tm,
                lambda what: self.measure(self.encoded, what, prefix),
                (lambda what: self.measure(val_enc, what)) if val_enc else None,
                accuracy,
            )
        )
        deltas = self.run_dir / DELTAS_FILENAME
        if self.dist.is_main:
            training = record.training_record(
                cfg,
                self.tm,
                self.model_info(),
                self._data_info(),
                result.history,
                accuracy,
                int(snap.correct.sum()),
                self.timings,
            )
            deltas = export_deltas(self.tm, self.run_dir, training)
        barrier(self.dist)  # every rank returns once the outputs exist
        self.log({"event": "done", "deltas": str(deltas), **accuracy, "reused": self.reused})
        return RunResult(
            self.run_dir,
            deltas,
            snap.accuracy,
            final.accuracy,
            val_before,
            val_after,
            result.history,
            list(self.reused),
            served={k: v for k, v in accuracy.items() if "served" in k},
            truncated=self.truncated,
        )


def run(
    cfg: TuneConfig,
    bars: Bars | None = None,
    echo: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> RunResult:
    """Run every stage of ``cfg``; see :class:`Pipeline`."""
    return Pipeline(cfg, bars, echo).run(on_epoch_end)
