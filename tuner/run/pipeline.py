"""`roma-tune run` end to end: data -> embeddings -> snapshot -> neighbours -> training -> export.

The pieces, each in its own module:

* :mod:`tuner.run.stages`: the stages in order (:class:`Pipeline`), and what they echo and log;
* :mod:`tuner.run.stage_cache`: each stage's output cached under ``RUN_DIR/cache`` in a file
  named by a hash of everything it depends on, reused when that file exists;
* :mod:`tuner.run.workdir`: the run directory's lock (one run at a time), the checkpoint
  policy (``RUN_DIR/checkpoints/<hash>``: a finished training is reused, an unfinished one
  continued with ``--resume`` or deleted with ``--overwrite``, never silently) and the
  clean-up of partial files a killed run left;
* :mod:`tuner.run.ranks`: who does what under torchrun;
* :mod:`tuner.run.record`: what ``config.json`` and the delta file record about the run.

Every file is written atomically (temp file + rename).
"""

from __future__ import annotations

from collections.abc import Callable

from tuner.config import TuneConfig
from tuner.progress import Bars
from tuner.run.stages import NoSuccessError, Pipeline, RunResult

__all__ = ["NoSuccessError", "Pipeline", "RunResult", "run"]


def run(
    cfg: TuneConfig,
    bars: Bars | None = None,
    echo: Callable[[str], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> RunResult:
    """Run every stage of ``cfg``; see :class:`Pipeline`."""
    return Pipeline(cfg, bars, echo).run(on_epoch_end)
