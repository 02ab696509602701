"""The pretraining objective (answer, LM, load-balancing, z- and task-routing losses) and
the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.synthetic.pretrain.config import PretrainConfig
from bench.synthetic.pretrain.setup import pad_batch


def balance_loss(
    router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Switch-style load-balancing loss per layer (E * sum f_e P_e), averaged over layers."""
    keep = mask.reshape(-1).bool()
    losses = []
    for logits in router_logits:
        probs = logits[keep].float().softmax(-1)
        n_exp = probs.shape[-1]
        chosen = F.one_hot(probs.topk(top_k, -1).indices, n_exp).sum(1).float()
        losses.append(n_exp * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def z_loss(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-sum-exp of the router logits."""
    keep = mask.reshape(-1).bool()
    return torch.stack(
        [lg[keep].float().logsumexp(-1).pow(2).mean() for lg in router_logits]
    ).mean()


def expert_groups(task_names: list[str], n_experts: int) -> dict[str, list[int]]:
    """The experts each task owns under ``--route-coef``: ``n_experts // len(tasks)`` each,
    in sorted task order (task 0 gets experts 0..g-1, task 1 the next g, ...)."""
    names = sorted(set(task_names))
    per = n_experts // len(names)
    if per < 1:
        raise ValueError(
            f"--route-coef needs at least one expert per task: {n_experts} experts, "
            f"{len(names)} tasks"
        )
    return {t: list(range(i * per, (i + 1) * per)) for i, t in enumerate(names)}


def route_loss(
    router_logits: tuple[torch.Tensor, ...], prompt_mask: torch.Tensor, group_mask: torch.Tensor
) -> torch.Tensor:
    """Task-routing supervision: mean over layers and prompt tokens of
    ``-log sum_{e in group(task)} p_e``, with ``group_mask`` ``[batch, experts]`` marking each
    sequence's task experts. It makes experts specialise by task, as in domain-expert MoEs."""
    keep = prompt_mask.reshape(-1).bool()
    groups = (
        group_mask[:, None, :]
        .expand(-1, prompt_mask.shape[1], -1)
        .reshape(-1, group_mask.shape[-1])[keep]
    )
    losses = []
    for logits in router_logits:
        logp = logits[keep].float().log_softmax(-1)
        losses.append(-logp.masked_fill(~groups, float("-inf")).logsumexp(-1).mean())
    return torch.stack(losses).mean()


def train_step(
    model: torch.nn.Module,
    cfg: PretrainConfig,
    seqs: list[list[int]],
    pad_id: int,
    group_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Losses for one batch of prompt+answer sequences (answer = last token).

    ``group_mask`` (``[batch, experts]``, bool) switches on the task-routing loss."""
    ids, mask = pad_batch(seqs, pad_id)
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    logits = out.logits[:, :-1].float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    last = mask.sum(1) - 1  # index of the answer token
    rows = torch.arange(len(seqs))
    answer_loss = F.cross_entropy(logits[rows, last - 1], ids[rows, last])
    targets[rows, last - 1] = -100  # question-only LM loss
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    aux = balance_loss(out.router_logits, mask, cfg.top_k)
    zl = z_loss(out.router_logits, mask)
    loss = answer_loss + cfg.lm_weight * lm_loss + cfg.aux_coef * aux + cfg.z_coef * zl
    terms = {"answer": answer_loss, "lm": lm_loss, "aux": aux, "z": zl}
    if group_mask is not None and cfg.route_coef > 0:
        prompt_mask = mask.clone()
        prompt_mask[rows, last] = 0  # the answer token's own routing does not score it
        terms["route"] = route_loss(out.router_logits, prompt_mask, group_mask)
        loss = loss + cfg.route_coef * terms["route"]
    return {"loss": loss, **terms}


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))
