"""Routing transplant: would a wrong sample be right if it were routed like its neighbours?

RoMA's premise is causal: a sample the model gets wrong would be answered correctly if its
routers behaved like those of its successful neighbours in the task-embedding space. This
tests it directly, without training. For every wrong sample with a neighbour, the target
``t_i = sum_j W_ij r_j`` (the neighbourhood's kernel-weighted mean routing vector, RoMA's own
N(i) and W) replaces the tuned routers' decision at that sample's last prompt token only (in
every row of a multi-token loglik sample): each tuned router outputs logits ``log t_i[L]``
there and sends the token to the top-k experts of ``t_i[L]`` with those probabilities as
weights, renormalised over the top-k when the router itself renormalises (see
:func:`renormalises`). Every other token and every untuned layer routes as usual. The share
of wrong samples this fixes is compared with two controls, the mean routing of ``k`` random
successful samples of the same task and of any task: if neighbours fix no more than random
successful routing does, the embedding neighbourhood carries no routing signal.

    roma-tune diagnose transplant --model MODEL --data train.jsonl
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from rich.progress import track

from tuner.config import DEFAULT_EMBEDDER
from tuner.diagnose.override import RouterOverride

KINDS = ("neighbours", "random_same_task", "random_any")


class RoutingOverride(RouterOverride):
    """Replace the tuned routers' output at chosen tokens by given routing distributions.

    Set :attr:`positions` (``[P]`` flat token indices) and :attr:`targets` (``[P, layers *
    experts]``, one probability distribution over experts per tuned layer, layers ascending)
    before a forward pass. The hooks are prepended, so a
    :class:`tuner.model.routing.RoutingCapture` entered before records the overridden logits.
    """

    def __init__(self, tm: Any) -> None:
        self.tm = tm
        self.positions: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        super().__init__(list(tm.router_modules.values()), self._edit, prepend=True)

    def _edit(
        self, n: int, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.positions is None or self.targets is None or not len(self.positions):
            return None
        e = self.tm.num_experts
        t = self.targets[:, n * e : (n + 1) * e].float()
        return self.positions, t.clamp_min(1e-30).log(), t


def prompt_positions(
    batch: Any, encoded: Sequence[Any], scope: str = "last"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat token indices, the sample in the batch each belongs to): the last prompt token
    (``last``) or every prompt token (``all``, used by ``bench.c3po``) of every row."""
    if scope not in ("last", "all"):
        raise ValueError(f"scope: 'last' or 'all', got {scope!r}")
    width = batch.input_ids.shape[1]
    flat: list[int] = []
    owner: list[int] = []
    for r, (s, j) in enumerate(batch.rows):
        off = width - batch.row_lengths[r] if batch.left_padded else 0
        n = encoded[batch.indices[s]].prompt_len(j)
        for t in range(n - 1 if scope == "last" else 0, n):
            flat.append(r * width + off + t)
            owner.append(s)
    return torch.tensor(flat), torch.tensor(owner)


@torch.no_grad()
def rescore(
    tm: Any, encoded: Sequence[Any], samples: list[int], targets: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Correctness ``[S]`` and choice scores of ``samples`` with ``targets[s]`` transplanted
    at every row's last prompt token (multi-row loglik samples: in each of their rows)."""
    from tuner.model.choice_loss import score
    from tuner.model.forward import collate, forward, sorted_batches
    from tuner.model.routing import RoutingCapture

    correct = torch.zeros(len(samples), dtype=torch.bool)
    scores: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    where = {i: s for s, i in enumerate(samples)}
    sub = [encoded[i] for i in samples]
    with RoutingCapture(tm) as cap, RoutingOverride(tm) as over:
        for idx in sorted_batches(sub, batch_size):
            batch = collate(encoded, [samples[i] for i in idx], tm.tokenizer.pad_token_id)
            flat, owner = prompt_positions(batch, encoded)
            over.positions, over.targets = flat, targets[torch.tensor(idx)][owner]
            out = forward(tm, batch.to(tm.device), cap)
            ok = score(out, batch).correct.cpu()
            for s, i in enumerate(batch.indices):
                correct[where[i]] = ok[s]
                scores[where[i]] = out.choice_scores[s][batch.choice_mask[s]].cpu()
    return correct, scores


def transplant_targets(
    kind: str, wrong: list[int], snap: Any, nb: Any, tasks: list[str], k: int, seed: int
) -> tuple[list[int], torch.Tensor]:
    """(samples tried, their ``[S, D]`` targets) for one target kind."""
    rng = np.random.default_rng(seed)
    succ = np.flatnonzero(snap.correct.numpy())
    chosen, rows = [], []
    for i in wrong:
        if kind == "neighbours":
            valid = nb.index[i] >= 0
            if not valid.any():
                continue
            w = torch.as_tensor(nb.weight[i][valid], dtype=torch.float32)
            rows.append(w @ snap.routing[nb.index[i][valid]])
        else:
            pool = [j for j in succ if j != i and (kind == "random_any" or tasks[j] == tasks[i])]
            if not pool:
                continue
            pick = rng.choice(pool, size=min(k, len(pool)), replace=False)
            rows.append(snap.routing[pick].mean(0))
        chosen.append(i)
    return chosen, torch.stack(rows) if rows else snap.routing[:0]


def _counts(
    idx: list[int], correct: list[bool], fixed: dict[str, tuple[set[int], set[int]]]
) -> dict[str, Any]:
    n, base = len(idx), sum(correct[i] for i in idx)
    out: dict[str, Any] = {"n": n, "wrong": n - base, "base_accuracy": base / max(n, 1)}
    for kind, (tried, ok) in fixed.items():
        t, f = len(tried & set(idx)), len(ok & set(idx))
        out[kind] = {
            "tried": t,
            "fixed": f,
            "fix_rate": f / t if t else 0.0,  # 0.0 when nothing was tried
            "accuracy_if_applied": (base + f) / max(n, 1),
        }
    return out


def transplant_accuracy(
    model: str,
    data: str,
    scoring: str = "loglik",
    layers: str | None = None,
    k: int = 3,
    sigma: float = 0.4,
    embedder: str = DEFAULT_EMBEDDER,
    template: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Share of wrong samples fixed by transplanting neighbour / random successful routing.

    Control targets average ``min(k, candidates)`` successful samples; a wrong sample without
    neighbours (or candidates) is not tried for that kind.
    """
    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples
    from tuner.model.load import load_model
    from tuner.roma.embed import embed_texts
    from tuner.roma.neighbours import find_neighbours
    from tuner.roma.snapshot import take_snapshot

    tm = load_model(model, layers, dtype, device, trust_remote_code)
    examples = load_examples(data, limit=limit).examples
    encoded = encode(examples, tm.tokenizer, scoring, template)
    snap = take_snapshot(tm, encoded, batch_size)
    emb = embed_texts([e.prompt for e in examples], embedder)
    nb = find_neighbours(emb, snap.correct.numpy(), k=k, sigma=sigma)
    tasks = [e.task for e in examples]
    correct = snap.correct.tolist()
    wrong = [i for i, c in enumerate(correct) if not c]
    fixed: dict[str, tuple[set[int], set[int]]] = {}
    for kind in track(KINDS, description="transplant", disable=not progress):
        chosen, targets = transplant_targets(kind, wrong, snap, nb, tasks, k, seed)
        ok = rescore(tm, encoded, chosen, targets, batch_size)[0] if chosen else torch.zeros(0)
        fixed[kind] = (set(chosen), {i for i, c in zip(chosen, ok.tolist(), strict=True) if c})
    result = _counts(list(range(len(examples))), correct, fixed)
    result["per_task"] = {
        t: _counts([i for i in range(len(tasks)) if tasks[i] == t], correct, fixed)
        for t in sorted(set(tasks))
    }
    return {**result, "k": k, "sigma": sigma, "layers": tm.layers, "scoring": scoring}


def table(r: dict[str, Any]) -> Any:
    """A rich table of the fix rate of each transplant target."""
    from rich.table import Table

    t = Table(
        title=f"Routing transplant: n={r['n']}, wrong {r['wrong']}, base "
        f"{100 * r['base_accuracy']:.1f}%, layers {r['layers']}, k={r['k']}"
    )
    for col in ("target", "fixed / tried", "fix rate", "accuracy if applied"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for kind in KINDS:
        x = r[kind]
        t.add_row(
            kind,
            f"{x['fixed']}/{x['tried']}",
            f"{x['fix_rate']:.3f}",
            f"{100 * x['accuracy_if_applied']:.1f}%",
        )
    return t


def main(model: str, data: str, *, json_out: str | None = None, **options: Any) -> dict[str, Any]:
    """The `roma-tune diagnose transplant` command: print the table, write JSON."""
    import json
    from pathlib import Path

    from rich.console import Console

    from roma_vllm.deltas import atomic_write

    r = transplant_accuracy(model, data, progress=True, **options)
    console = Console()
    console.print(table(r))
    if json_out:
        text = json.dumps(r, indent=2) + "\n"
        atomic_write(json_out, lambda tmp: Path(tmp).write_text(text))
        console.print(f"wrote {json_out}")
    return r
