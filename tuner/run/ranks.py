"""Who does what under torchrun, outside the training loop.

Rank 0 alone takes the run directory's lock, reads and writes files and computes the
embeddings and neighbours; the other ranks get its results (:func:`on_main`). The no-grad
passes (routing snapshots, validation) are split over the ranks by batch and summed back
(:func:`split_snapshot`), bit for bit what one process computes. In a single process every
function here is a plain call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from roma_vllm.errors import RomaError
from tuner.data.prompts import Encoded
from tuner.model.forward import sorted_batches
from tuner.model.frozen_cache import PrefixCache
from tuner.model.load import TunerModel
from tuner.progress import Bars
from tuner.roma.snapshot import Snapshot, take_snapshot
from tuner.train.distributed import Dist, broadcast, reduce_disjoint

T = TypeVar("T")


def on_main(fn: Callable[[], T], dist: Dist) -> T:
    """``fn()`` run by rank 0, its result on every rank.

    A :class:`RomaError` raised by ``fn`` on rank 0 is raised on every rank, so that all
    of them stop with the same one-line error instead of waiting for rank 0.
    """
    if not dist.enabled:
        return fn()
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except RomaError as e:
            error = e
    result, error = broadcast((result, error), dist)
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def split_snapshot(
    tm: TunerModel,
    encoded: Sequence[Encoded],
    batch_size: int,
    prefix: PrefixCache | None,
    routing_vector: str,
    dist: Dist,
    bars: Bars,
    name: str,
) -> Snapshot:
    """:func:`take_snapshot` of ``encoded`` split over the ranks; every rank gets all of it."""
    if not dist.enabled:
        with bars.task(name, len(encoded)) as advance:
            return take_snapshot(tm, encoded, batch_size, prefix, advance, routing_vector)
    # This rank's share: every world_size-th of the length-sorted batches. Listed in
    # global sorted order they sort (and so batch) exactly as they do in one process,
    # so every sample's result is bit for bit the single-process one.
    batches = sorted_batches(encoded, batch_size)[dist.rank :: dist.world_size]
    mine = [i for b in batches for i in b]
    view = prefix.remapped(mine) if prefix is not None else None
    with bars.task(name, len(mine)) as advance:
        part = take_snapshot(
            tm, [encoded[i] for i in mine], batch_size, view, advance, routing_vector
        )
    n, where = len(encoded), torch.tensor(mine, dtype=torch.long)
    full = {
        "correct": torch.zeros(n, dtype=torch.bool),
        "prediction": torch.zeros(n, dtype=torch.long),  # + 1: zero means "not mine"
        "loss": torch.zeros(n),
        "routing": torch.zeros(n, part.routing.shape[1]),
    }
    full["correct"][where] = part.correct
    full["prediction"][where] = part.prediction + 1
    full["loss"][where] = part.loss
    full["routing"][where] = part.routing
    full = reduce_disjoint(full, dist)
    return Snapshot(full["correct"], full["prediction"] - 1, full["loss"], full["routing"])
