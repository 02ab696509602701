"""Routing snapshot: one no-grad pass with the current routers.

For every sample: correct or not, its prediction, its task loss and its routing vector.
The successful set S of RoMA is ``correct``; the neighbours' target routing vectors r_j
are rows of ``routing``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tuner.data.prompts import Encoded
from tuner.model.choice_loss import score
from tuner.model.forward import collate, forward, sorted_batches
from tuner.model.frozen_cache import PrefixCache
from tuner.model.load import TunerModel
from tuner.model.routing import RoutingCapture


@dataclass
class Snapshot:
    correct: torch.Tensor  # [N] bool
    prediction: torch.Tensor  # [N] long
    loss: torch.Tensor  # [N] float32
    routing: torch.Tensor  # [N, layers * experts] float32

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "correct": self.correct.to(torch.uint8),
            "prediction": self.prediction,
            "loss": self.loss,
            "routing": self.routing,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Snapshot:
        return cls(t["correct"].bool(), t["prediction"], t["loss"], t["routing"])


@torch.no_grad()
def take_snapshot(
    tm: TunerModel,
    encoded: Sequence[Encoded],
    batch_size: int,
    prefix: PrefixCache | None = None,
    progress: Callable[[int], None] | None = None,
    routing_vector: str = "probs",
) -> Snapshot:
    """Correctness, predictions, losses and routing vectors of every sample
    (``routing_vector``: see :class:`tuner.model.routing.RoutingCapture`)."""
    n = len(encoded)
    dim = len(tm.layers) * tm.num_experts
    snap = Snapshot(
        torch.zeros(n, dtype=torch.bool),
        torch.full((n,), -1, dtype=torch.long),
        torch.zeros(n),
        torch.zeros(n, dim),
    )
    pad = tm.tokenizer.pad_token_id
    with RoutingCapture(tm, routing_vector) as cap:
        for idx in sorted_batches(encoded, batch_size):
            batch = collate(encoded, idx, pad)
            states = prefix.states(batch).to(tm.device) if prefix is not None else None
            batch.to(tm.device)
            out = forward(tm, batch, cap, states)
            s = score(out, batch)
            where = torch.tensor(idx)
            snap.correct[where] = s.correct.cpu()
            snap.prediction[where] = s.prediction.cpu()
            snap.loss[where] = s.loss.float().cpu()
            snap.routing[where] = out.routing.float().cpu()
            if progress:
                progress(len(idx))
    return snap
