"""The naive implementation of the RoMA objective that ``roma-tune run``'s training step is
measured against (see the package docstring), and the check that both compute the same
loss and router gradients."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.tuner_speed.setup import Setup, tune_config


def naive_loss(tm: Any, encoded: list[Any], idx: list[int], width: int, snap: Any, nb: Any,
               lam: float, capture: Any) -> Any:  # fmt: skip
    """The RoMA loss of samples ``idx`` the straightforward way (see the module docstring)."""
    import torch

    from tuner.roma.objective import roma_loss

    dev = tm.device
    pad = tm.tokenizer.pad_token_id
    ids = torch.full((len(idx), width), pad, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    lengths = []
    for r, i in enumerate(idx):
        p = encoded[i].prompt_ids
        ids[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = 1
        lengths.append(len(p))
    ids, mask = ids.to(dev), mask.to(dev)
    last = torch.tensor(lengths, device=dev) - 1
    capture.positions = torch.arange(len(idx), device=dev) * width + last
    embeds = tm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = tm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    at_last = logits.float()[torch.arange(len(idx), device=dev), last]  # [B, vocab]
    options = torch.tensor([encoded[i].option_ids for i in idx], device=dev)
    labels = torch.tensor([encoded[i].label for i in idx], device=dev)
    task = torch.nn.functional.cross_entropy(at_last.gather(1, options), labels, reduction="none")
    targets, weights = nb.targets(snap.routing, idx)
    return roma_loss(task, capture.vectors(), targets.to(dev), weights.to(dev), lam)


def naive_train(tm: Any, encoded: list[Any], s: Setup, snap: Any, nb: Any) -> list[dict]:
    """``s.epochs`` epochs of the naive loop; wall and CPU seconds of each epoch."""
    import torch

    from tuner.model.routing import RoutingCapture
    from tuner.train.loop import warmup_factor

    torch.manual_seed(s.seed)
    params = tm.parameters()
    cfg = tune_config(s, Path(), Path())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    width = max(len(e.prompt_ids) for e in encoded)  # padded to the dataset's longest
    per_epoch = -(-len(encoded) // s.batch_size)
    step, epochs = 0, []
    with RoutingCapture(tm) as capture:
        for epoch in range(s.epochs):
            wall, cpu = time.perf_counter(), time.process_time()
            g = torch.Generator().manual_seed(s.seed * 100_003 + epoch)
            perm = torch.randperm(len(encoded), generator=g).tolist()
            for b in range(per_epoch):
                idx = perm[b * s.batch_size : (b + 1) * s.batch_size]
                f = warmup_factor(step, per_epoch * s.epochs, cfg.warmup)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * f
                opt.zero_grad(set_to_none=True)
                naive_loss(tm, encoded, idx, width, snap, nb, cfg.lam * f, capture).total.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                step += 1
            epochs.append(
                {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
            )
    return epochs


def check_objective(tm: Any, encoded: list[Any], snap: Any, nb: Any, s: Setup) -> dict:
    """Loss and router gradients of one batch, naive vs ours: they must agree."""
    from tuner.model.forward import collate
    from tuner.model.routing import RoutingCapture
    from tuner.train.loop import train_step

    idx = list(range(min(s.batch_size, len(encoded))))
    width = max(len(e.prompt_ids) for e in encoded)
    params = tm.parameters()
    with RoutingCapture(tm) as capture:
        for p in params:
            p.grad = None
        naive = naive_loss(tm, encoded, idx, width, snap, nb, s.lam, capture)
        naive.total.backward()
        g_naive = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        batch = collate(encoded, idx, tm.tokenizer.pad_token_id).to(tm.device)
        targets, weights = nb.targets(snap.routing, idx)
        ours, _ = train_step(tm, batch, targets.to(tm.device), weights.to(tm.device), s.lam,
                             capture)  # fmt: skip
        g_ours = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    naive_total, ours_total = float(naive.total.detach()), float(ours.total.detach())
    loss_diff = abs(naive_total - ours_total)
    grad_rel = max(
        float((a - b).norm() / b.norm().clamp(min=1e-30))
        for a, b in zip(g_naive, g_ours, strict=True)
    )
    if loss_diff > 1e-4 * max(1.0, abs(ours_total)) or grad_rel > 1e-3:
        raise AssertionError(
            f"naive and ours disagree: loss {naive_total} vs {ours_total}, "
            f"gradient relative difference {grad_rel:.2e}"
        )
    return {
        "loss": ours_total,
        "loss_abs_diff": loss_diff,
        "grad_max_rel_diff": grad_rel,
    }
