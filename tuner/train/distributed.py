"""Data parallel training under ``torchrun``: one process per device, routers replicated.

``torchrun --nproc-per-node N roma-tune run ...`` starts N processes; each joins the
process group (gloo on CPU, NCCL on GPU, one GPU per process by ``LOCAL_RANK``) and holds a
full copy of the model. ``--batch-size`` stays the *global* batch: every process builds the
same seeded batch order and takes a strided shard of each batch (:func:`shard`), scales its
mean loss by ``local / global`` samples and, after backward, the router gradients (plus a
few loss statistics) are summed across processes in one all-reduce (:func:`sync_gradients`).
The sum is then exactly the gradient of the mean over the global batch, so clipping and
AdamW see what one process would see, and the routers stay identical on every rank.

Only the router gradients are reduced (they are the only tensors requiring grad), by hand
rather than with ``DistributedDataParallel``: a rank whose shard is empty (a last batch
smaller than the world) still joins the reduction with zeros, which DDP cannot do.

Stages other than training: the no-grad passes (routing snapshots, validation) are split
over the ranks by batch and summed back (:func:`reduce_disjoint`); embeddings and
neighbours are computed on rank 0 and broadcast; rank 0 alone writes files and shows
progress. The prefix cache is built by rank 0 in ``RUN_DIR``, which the other ranks then
read: with several machines, ``RUN_DIR`` must be on a shared filesystem.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tuner.config import ConfigError

T = TypeVar("T")

# Rank 0 alone computes embeddings and the prefix cache while the others wait.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (``world_size`` 1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run: cpu (gloo) or cuda:N (nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def launched_world_size() -> int:
    """Processes started by torchrun (``WORLD_SIZE``), 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or not under torchrun); usable before :func:`init`."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: str = "auto") -> Dist:
    """Join torchrun's process group when launched by it; :data:`SINGLE` otherwise.

    CUDA (``device`` cuda, or auto with CUDA available): NCCL, one GPU per process by
    ``LOCAL_RANK``; otherwise gloo on CPU.
    """
    world = launched_world_size()
    if world <= 1:
        return SINGLE
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dev = "cpu"
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available")
        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    if not td.is_initialized():
        td.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(d: Dist) -> None:
    """Leave the process group joined by :func:`init`."""
    if d.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def shard(indices: Sequence[int], d: Dist) -> list[int]:
    """This rank's part of a global batch: every ``world_size``-th sample from ``rank``.

    Batches are sorted by length inside, so strided shards have similar lengths.
    """
    return list(indices[d.rank :: d.world_size])


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as td

        td.barrier()


def broadcast(obj: T, d: Dist) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small and medium objects)."""
    if not d.enabled:
        return obj
    import torch.distributed as td

    box: list[Any] = [obj if d.is_main else None]
    td.broadcast_object_list(box, src=0, device=torch.device(d.device))
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks (a new tensor on the tensor's device)."""
    if not d.enabled:
        return tensor
    import torch.distributed as td

    buf = tensor.to(d.device).clone()
    td.all_reduce(buf, op=td.ReduceOp.SUM)
    return buf.to(tensor.device)


def reduce_disjoint(tensors: dict[str, torch.Tensor], d: Dist) -> dict[str, torch.Tensor]:
    """Combine per-rank results where each rank filled disjoint rows and left zeros elsewhere.

    ``x + 0 == x`` exactly in floating point, so the result equals one process's bit for
    bit. Bool tensors travel as uint8.
    """
    if not d.enabled:
        return tensors
    out = {}
    for name, t in tensors.items():
        if t.dtype == torch.bool:
            out[name] = all_reduce_sum(t.to(torch.uint8), d).bool()
        else:
            out[name] = all_reduce_sum(t, d)
    return out


def sync_gradients(
    params: Sequence[torch.nn.Parameter], stats: torch.Tensor, d: Dist
) -> torch.Tensor:
    """Sum the router gradients and ``stats`` (a small vector) over the ranks, in place.

    A parameter without a gradient (an empty shard) contributes zeros. Returns the summed
    ``stats``. No-op (``stats`` returned as is) in a single process.
    """
    if not d.enabled:
        return stats
    grads = [
        p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel()) for p in params
    ]
    flat = torch.cat([g.to(d.device) for g in grads] + [stats.float().to(d.device)])
    flat = all_reduce_sum(flat, d)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
        offset += n
    return flat[offset:].to("cpu", stats.dtype)
