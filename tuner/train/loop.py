"""The training loop: AdamW on the tuned routers only, RoMA loss, a checkpoint every epoch.

:func:`train_step` is a pure function of (model, batch, targets): forward, loss, backward.
The loop around it owns the optimiser, the schedule (linear warm-up of both the learning
rate and lambda over the first ``warmup`` fraction of steps, then constant), batch order
(seeded per epoch, so a resumed run sees the same batches), the refresh of the neighbours'
targets and the checkpoints.

Under torchrun (:mod:`tuner.train.distributed`) every rank walks the same batch order, runs
``train_step`` on its shard of each global batch with the loss scaled by
``local / global`` samples, and the router gradients are summed across ranks between
``train_step`` and the optimiser step: the same update as one process with the same global
batch. Rank 0 alone writes checkpoints (:mod:`tuner.train.checkpoints`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuner.config import TuneConfig
from tuner.data.prompts import Encoded
from tuner.model.choice_loss import Scored, score
from tuner.model.dense_grad import DenseRouterGrad
from tuner.model.forward import Batch, bucket_batches, collate, forward
from tuner.model.frozen_cache import PrefixCache
from tuner.model.load import TunerModel
from tuner.model.routing import RoutingCapture
from tuner.roma.neighbours import Neighbours
from tuner.roma.objective import LossTerms, roma_loss
from tuner.roma.snapshot import Snapshot
from tuner.train.checkpoints import (
    TrainState,
    all_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tuner.train.distributed import SINGLE, Dist, broadcast, shard, sync_gradients


@dataclass
class EpochRecord:
    """What one epoch did; one line of the training log and of the delta metadata."""

    epoch: int
    steps: int
    loss: float
    task_loss: float
    manifold: float
    lam: float  # lambda at the end of the epoch (after warm-up scaling)
    lr: float
    running_accuracy: float  # train accuracy measured during the epoch's forward passes
    train_accuracy: float | None = None  # snapshot after the epoch (when one was taken)
    val_accuracy: float | None = None
    successful: int | None = None  # size of S used as targets during this epoch
    without_neighbours: int | None = None
    seconds: float = 0.0
    samples_per_second: float = 0.0


@dataclass
class TrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    final: Snapshot | None = None
    resumed_from: int | None = None  # last completed epoch found on disk


def _no_progress(n: int, info: str | None = None) -> None:
    pass


def warmup_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup * total`` steps, then 1."""
    n = round(warmup * total)
    return 1.0 if n <= 0 else min(1.0, (step + 1) / n)


def train_step(
    tm: TunerModel,
    batch: Batch,
    targets: torch.Tensor,
    weights: torch.Tensor,
    lam: float,
    capture: RoutingCapture,
    prefix: torch.Tensor | None = None,
    scale: float = 1.0,
    router_grad: str = "topk",
) -> tuple[LossTerms, Scored]:
    """Forward, RoMA loss and backward for one batch; leaves gradients on the routers.

    The gradient is that of ``scale`` times the batch-mean loss: a data-parallel rank
    passes ``len(shard) / len(global batch)`` so that the ranks' summed gradients are the
    gradient of the mean over the global batch. The returned terms are unscaled means.
    ``router_grad="dense"``: the same forward values, the backward of the dense mixture of
    all experts in the tuned layers (:mod:`tuner.model.dense_grad`).
    """
    dense = router_grad == "dense"
    with DenseRouterGrad(tm) if dense else contextlib.nullcontext():
        out = forward(tm, batch, capture, prefix)
    scored = score(out, batch)
    terms = roma_loss(scored.loss, out.routing, targets, weights, lam)
    (terms.total * scale if scale != 1.0 else terms.total).backward()
    return terms, scored


def _micro(indices: list[int], size: int | None) -> list[list[int]]:
    """``indices`` in consecutive micro-batches of at most ``size`` (None: one)."""
    if not indices:
        return []
    step = size or len(indices)
    return [indices[i : i + step] for i in range(0, len(indices), step)]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def train(
    tm: TunerModel,
    encoded: Sequence[Encoded],
    cfg: TuneConfig,
    snapshot: Snapshot,
    neighbours_for: Callable[[Snapshot], Neighbours],
    take_snapshot: Callable[[], Snapshot],
    checkpoint_dir: Path,
    *,
    resume: bool = False,
    neighbours: Neighbours | None = None,
    prefix: PrefixCache | None = None,
    validate: Callable[[], float] | None = None,
    bars: Any = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    dist: Dist = SINGLE,
) -> TrainResult:
    """Train ``tm``'s routers for ``cfg.epochs`` epochs; returns the history and final snapshot.

    ``snapshot`` is the routing snapshot before training; ``neighbours_for`` builds N(i) and
    W from a snapshot (``neighbours``: those of ``snapshot``, when already built);
    ``take_snapshot`` re-measures with the current routers. With ``resume`` the latest
    checkpoint in ``checkpoint_dir`` is loaded and training continues after it (a completed
    run is returned as is). With ``dist`` (torchrun) every rank calls this with the same
    arguments; ``take_snapshot``, ``neighbours_for`` and ``validate`` must then be
    collective (the same result on every rank), see :mod:`tuner.train.distributed`.
    """
    torch.manual_seed(cfg.seed)
    log = log or (lambda event: None)
    params = tm.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches_per_epoch = -(-len(encoded) // cfg.batch_size)
    total_steps = batches_per_epoch * cfg.epochs
    result = TrainResult()
    start = 0
    if neighbours is None:
        neighbours = neighbours_for(snapshot)
    final: Snapshot | None = None

    ckpt = latest_checkpoint(checkpoint_dir) if resume and dist.is_main else None
    state = load_checkpoint(ckpt) if ckpt is not None else None
    state, ckpt = broadcast((state, ckpt), dist)  # rank 0's files need not be shared
    if state is not None:
        tm.load_router_state(state.routers)
        opt.load_state_dict(state.optimizer)
        result.history = [EpochRecord(**r) for r in state.history]
        snapshot, neighbours, final = state.snapshot, state.neighbours, state.final
        start = state.epoch + 1
        result.resumed_from = state.epoch
        log({"event": "resume", "from_epoch": state.epoch, "checkpoint": str(ckpt)})

    pad = tm.tokenizer.pad_token_id
    step = start * batches_per_epoch
    with RoutingCapture(tm, cfg.routing_vector) as capture:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            batches = bucket_batches(encoded, cfg.batch_size, _epoch_generator(cfg.seed, epoch))
            sums = {"loss": 0.0, "task": 0.0, "manifold": 0.0, "correct": 0, "n": 0}
            lam = lr = 0.0
            desc = f"train epoch {epoch + 1}/{cfg.epochs}"
            bar = bars.task(desc, len(encoded)) if bars else contextlib.nullcontext(_no_progress)
            with bar as advance:
                for idx in batches:
                    f = warmup_factor(step, total_steps, cfg.warmup)
                    lr, lam = cfg.lr * f, cfg.lam * f
                    for g in opt.param_groups:
                        g["lr"] = lr
                    mine = shard(idx, dist) if dist.enabled else idx
                    opt.zero_grad(set_to_none=True)
                    # loss, task, manifold (sums over this rank's samples), correct, samples
                    stats = torch.zeros(5, dtype=torch.float64)
                    # micro-batches accumulate the gradient of the same global-batch mean
                    for part in _micro(mine, cfg.micro_batch_size):
                        batch = collate(encoded, part, pad)
                        states = prefix.states(batch).to(tm.device) if prefix is not None else None
                        batch.to(tm.device)
                        targets, weights = neighbours.targets(snapshot.routing, part)
                        terms, scored = train_step(
                            tm,
                            batch,
                            targets.to(tm.device),
                            weights.to(tm.device),
                            lam,
                            capture,
                            states,
                            scale=len(part) / len(idx),
                            router_grad=cfg.router_grad,
                        )
                        n = len(part)
                        stats += torch.tensor(
                            [
                                float(terms.total.detach()) * n,
                                float(terms.task) * n,
                                float(terms.manifold) * n,
                                float(scored.correct.sum()),
                                float(n),
                            ],
                            dtype=torch.float64,
                        )
                    stats = sync_gradients(params, stats, dist)
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    step += 1
                    sums["loss"] += float(stats[0])
                    sums["task"] += float(stats[1])
                    sums["manifold"] += float(stats[2])
                    sums["correct"] += round(float(stats[3]))
                    sums["n"] += round(float(stats[4]))
                    advance(len(idx), f"loss {sums['loss'] / sums['n']:.4f}")
            seconds = time.perf_counter() - t0
            record = EpochRecord(
                epoch=epoch,
                steps=len(batches),
                loss=sums["loss"] / sums["n"],
                task_loss=sums["task"] / sums["n"],
                manifold=sums["manifold"] / sums["n"],
                lam=lam,
                lr=lr,
                running_accuracy=sums["correct"] / sums["n"],
                successful=int(snapshot.correct.sum()),
                without_neighbours=neighbours.empty,
                seconds=seconds,
                samples_per_second=sums["n"] / seconds if seconds > 0 else 0.0,
            )
            last = epoch == cfg.epochs - 1
            if cfg.refresh == "epoch" or last:
                after = take_snapshot()
                record.train_accuracy = after.accuracy
                if last:
                    final = after
                else:
                    snapshot, neighbours = after, neighbours_for(after)
            if validate is not None:
                record.val_accuracy = validate()
            result.history.append(record)
            log({"event": "epoch", **asdict(record)})
            if dist.is_main:
                _save(checkpoint_dir, epoch, tm, opt, result.history, snapshot, neighbours, final)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    result.final = final if final is not None else take_snapshot()
    return result


def _save(
    directory: Path,
    epoch: int,
    tm: TunerModel,
    opt: torch.optim.Optimizer,
    history: list[EpochRecord],
    snapshot: Snapshot,
    neighbours: Neighbours,
    final: Snapshot | None,
) -> None:
    state = TrainState(
        epoch=epoch,
        routers=tm.router_state(),
        optimizer=opt.state_dict(),
        history=[asdict(r) for r in history],
        snapshot=snapshot,
        neighbours=neighbours,
        final=final,
    )
    path = save_checkpoint(directory, state)
    for old in all_checkpoints(directory):  # superseded by the one just written
        if old != path:
            old.unlink(missing_ok=True)
