"""The RoMA objective for a batch.

    L(i) = CE(f(x_i), y_i) + lambda * sum_{j in N(i)} W_ij * || r_i - r_j ||^2

``r_i`` comes from the current routers with gradient (:mod:`tuner.model.routing`); ``r_j`` are
targets without gradient. The batch loss is the mean of L(i) over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerms:
    total: torch.Tensor  # scalar, differentiable
    task: torch.Tensor  # scalar: mean task loss
    manifold: torch.Tensor  # scalar: mean manifold term (before lambda)


def manifold_term(
    routing: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``sum_j W_ij ||r_i - r_j||^2``: routing ``[S, D]``, targets ``[S, K, D]``,
    weights ``[S, K]`` (zero rows give 0)."""
    diff = routing[:, None, :] - targets.detach().to(routing)
    return (weights.to(routing) * diff.pow(2).sum(-1)).sum(-1)


def roma_loss(
    task_loss: torch.Tensor,
    routing: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    lam: float,
) -> LossTerms:
    """Mean over the batch of task loss + ``lam`` * manifold term."""
    manifold = manifold_term(routing, targets, weights)
    task = task_loss.mean()
    man = manifold.mean()
    total = task + lam * man if lam else task + 0.0 * man
    return LossTerms(total, task.detach(), man.detach())
