"""The pretraining loop: train, evaluate, save checkpoint, tokenizer and ``metrics.json``."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.common import write_json
from bench.synthetic.pretrain.config import DOWNSTREAM_SPLITS, N_HELDOUT, WRAPPERS, PretrainConfig
from bench.synthetic.pretrain.losses import expert_groups, lr_at, train_step
from bench.synthetic.pretrain.metrics import accuracy_by_task, evaluate, routing_stats
from bench.synthetic.pretrain.setup import build_model, build_tokenizer, encode, vocab_from_data
from bench.synthetic.tasks import read_jsonl


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(data: Path, out: Path, cfg: PretrainConfig, progress: bool = True) -> dict[str, Any]:
    """Pretrain on ``data/pretrain.jsonl``; save checkpoint, tokenizer and metrics under ``out``.

    Downstream ``train.jsonl``/``val.jsonl`` under ``data``, when present, are only
    evaluated (unseen phrasings); ``test.jsonl`` is never read except for the vocabulary.
    """
    import transformers
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    data, out = Path(data), Path(out)
    pretrain_file = data / "pretrain.jsonl"
    if not pretrain_file.exists():
        raise FileNotFoundError(
            f"{pretrain_file}: missing; run python -m bench.synthetic.tasks --out {data}"
        )
    # One thread: reproducible, and far faster than two on a shared 2-core machine.
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(vocab_from_data(data))
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())

    rows = read_jsonl(pretrain_file)
    n_held = min(N_HELDOUT, len(rows) // 5)
    train_enc = encode(rows[n_held:], tokenizer)
    held_enc = encode(rows[:n_held], tokenizer)
    pad = tokenizer.pad_token_id

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    n_rows, n_wrap = len(train_enc.answers), len(WRAPPERS)
    qa_tasks = {t for t in cfg.qa_tasks.split(",") if t}
    unknown = sorted(qa_tasks - set(train_enc.tasks))
    if unknown:
        raise ValueError(f"--qa-tasks: {unknown} are not tasks of {pretrain_file}")
    groups = expert_groups(train_enc.tasks, cfg.experts) if cfg.route_coef > 0 else None
    row_groups = None
    if groups is not None:
        row_groups = torch.zeros(n_rows, cfg.experts, dtype=torch.bool)
        for i, t in enumerate(train_enc.tasks):
            row_groups[i, groups[t]] = True

    t0 = time.perf_counter()
    step, cut_short, ema = 0, False, None
    columns = (
        TextColumn("pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, info="")
        model.train()
        while step < cfg.steps:
            if time.perf_counter() - t0 > cfg.minutes * 60:
                cut_short = True
                break
            idx = torch.randint(n_rows, (cfg.batch_size,), generator=gen).tolist()
            wrap = torch.randint(n_wrap, (cfg.batch_size,), generator=gen).tolist()
            if qa_tasks:  # the Q/A format is the marker of those tasks' source alone
                wrap = [int(train_enc.tasks[i] in qa_tasks) for i in idx]
            seqs = [
                train_enc.prompts[i][w] + [train_enc.choices[i][train_enc.answers[i]]]
                for i, w in zip(idx, wrap, strict=True)
            ]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            group_mask = None if row_groups is None else row_groups[idx]
            losses = train_step(model, cfg, seqs, pad, group_mask)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            a = losses["answer"].item()
            ema = a if ema is None else 0.98 * ema + 0.02 * a
            info = f"answer loss {ema:.3f} aux {losses['aux'].item():.3f}"
            if "route" in losses:
                info += f" route {losses['route'].item():.3f}"
            bar.update(task, advance=1, info=info)
            if progress and not bar.console.is_terminal and step % 100 == 0:
                bar.console.print(f"step {step}/{cfg.steps} {time.perf_counter() - t0:.0f}s {info}")
    train_s = time.perf_counter() - t0

    # Round to the saved dtype first, so the metrics describe the shipped weights.
    save_dtype = getattr(torch, cfg.dtype)
    model = model.to(save_dtype).float()
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "seed": cfg.seed,
        "arch": cfg.arch,
        "steps": step,
        "cut_short_by_minutes": cut_short,
        "train_seconds": round(train_s, 1),
        "seconds_per_step": round(train_s / max(step, 1), 3),
        "torch_threads": torch.get_num_threads(),
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "final_answer_loss_ema": round(ema or float("nan"), 4),
        "accuracy": {},
        "routing": {},
        "config": asdict(cfg),
        "data": {p.name: _sha256(p) for p in sorted(data.glob("*.jsonl"))},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wrappers": list(WRAPPERS),
        "expert_groups": groups,
    }
    evals = {"pretrain_heldout": held_enc}
    for split in DOWNSTREAM_SPLITS:
        if (data / f"{split}.jsonl").exists():
            evals[f"downstream_{split}"] = encode(read_jsonl(data / f"{split}.jsonl"), tokenizer)
    for name, enc in evals.items():
        for w in (0, 1):
            res = evaluate(model, enc, w, pad)
            key = f"{name}/{'raw' if w == 0 else 'qa'}"
            metrics["accuracy"][key] = {
                k: round(v, 4) for k, v in accuracy_by_task(res["correct"], enc.tasks).items()
            }
            if w == 1 and name.startswith("downstream"):
                metrics["routing"][key] = routing_stats(
                    res["router_probs"], enc.tasks, cfg.top_k, groups=groups
                )

    model.to(save_dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "metrics.json", metrics, indent=1)
    return metrics
