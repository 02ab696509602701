"""Measurement: accuracy among the choices, and how task-organised the routing is."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bench.synthetic.pretrain.setup import Encoded, pad_batch


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, enc: Encoded, wrapper: int, pad_id: int, batch_size: int = 128
) -> dict[str, Any]:
    """Accuracy among the choices (one forward pass) and last-token router probabilities."""
    model.eval()
    correct, probs = [], []
    for start in range(0, len(enc.answers), batch_size):
        idx = range(start, min(start + batch_size, len(enc.answers)))
        ids, mask = pad_batch([enc.prompts[i][wrapper] for i in idx], pad_id)
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        last = mask.sum(1) - 1
        rows = torch.arange(len(idx))
        for j, i in enumerate(idx):
            scores = out.logits[j, last[j], enc.choices[i]]
            correct.append(int(scores.argmax()) == enc.answers[i])
        flat = rows * ids.shape[1] + last  # router rows are flattened (batch * seq)
        probs.append(torch.stack([lg[flat].float().softmax(-1) for lg in out.router_logits], 1))
    model.train()
    return {"correct": correct, "router_probs": torch.cat(probs)}  # [N, layers, experts]


def accuracy_by_task(correct: list[bool], tasks: list[str]) -> dict[str, float]:
    """Mean accuracy overall (key ``all``) and per task."""
    out = {"all": sum(correct) / len(correct)}
    for t in sorted(set(tasks)):
        hits = [c for c, tt in zip(correct, tasks, strict=True) if tt == t]
        out[t] = sum(hits) / len(hits)
    return out


def routing_stats(
    probs: torch.Tensor,
    tasks: list[str],
    top_k: int,
    k_nn: int = 5,
    groups: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """How task-organised last-token routing is, per layer.

    - ``modal_share``: per task, the share of its samples whose top-1 expert is the task's
      most common top-1 expert, averaged over tasks (1 = each task has one expert).
    - ``expert_purity``: per expert, the share of its top-1 samples from its dominant task,
      weighted by load (1/#tasks ~ no organisation).
    - ``nmi``: normalised mutual information between task and top-1 expert.
    - ``usage``: per task, the fraction of samples routing to each expert (top-k).
    - ``knn_same_task`` (all layers, and the last two): share of each sample's ``k_nn``
      nearest routing vectors (cosine, concatenated softmax) that come from its task.
    - ``in_group`` (with ``groups``, the experts each task owns): share of the top-k experts
      that belong to the sample's task.
    """
    names = sorted(set(tasks))
    t_idx = torch.tensor([names.index(t) for t in tasks])
    n_layers, n_exp = probs.shape[1], probs.shape[2]
    layers = []
    for layer in range(n_layers):
        top1 = probs[:, layer].argmax(-1)
        joint = torch.zeros(len(names), n_exp)
        joint.index_put_((t_idx, top1), torch.ones(len(tasks)), accumulate=True)
        modal = (joint.max(1).values / joint.sum(1)).mean().item()
        purity = (joint.max(0).values.sum() / joint.sum()).item()
        p = joint / joint.sum()
        pt, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
        nz = p > 0
        mi = (p[nz] * (p[nz] / (pt @ pe)[nz]).log()).sum()
        h = lambda q: -(q[q > 0] * q[q > 0].log()).sum()  # noqa: E731
        nmi = (2 * mi / (h(pt) + h(pe))).item() if h(pt) + h(pe) > 0 else 0.0
        chosen = F.one_hot(probs[:, layer].topk(top_k, -1).indices, n_exp).sum(1).float()
        usage = {
            t: chosen[t_idx == i].mean(0).round(decimals=3).tolist() for i, t in enumerate(names)
        }
        stats = {
            "modal_share": round(modal, 3),
            "expert_purity": round(purity, 3),
            "nmi": round(nmi, 3),
            "usage": usage,
        }
        if groups is not None:
            top = probs[:, layer].topk(top_k, -1).indices
            owned = torch.tensor(
                [[e in groups[t] for e in row] for t, row in zip(tasks, top.tolist(), strict=True)]
            )
            stats["in_group"] = round(owned.float().mean().item(), 3)
        layers.append(stats)

    def knn(vecs: torch.Tensor) -> float:
        v = F.normalize(vecs.reshape(len(vecs), -1), dim=-1)
        sim = v @ v.T
        sim.fill_diagonal_(-2)
        nn = sim.topk(k_nn, -1).indices
        return round((t_idx[nn] == t_idx[:, None]).float().mean().item(), 3)

    return {
        "layers": layers,
        "knn_same_task_all_layers": knn(probs),
        "knn_same_task_last2": knn(probs[:, -2:]),
        "knn_chance": round(
            sum((t_idx == i).float().mean().item() ** 2 for i in range(len(names))), 3
        ),
    }
