"""Pretrain a small MoE from scratch on the synthetic tasks, on CPU, in minutes.

The model is an OLMoE (or, with ``--arch qwen3moe``, a Qwen3-MoE) built from its
``transformers`` config, with a word-level tokenizer over the data's words. It is trained as
a language model on the pretraining phrasings with the loss on the answer word (cloze), a
lighter LM loss on the question, a per-layer load-balancing loss and a router z-loss. Each
prompt is used raw or wrapped in ``Question: ...\nAnswer:`` (the tuner's default loglik
template), half each, so the model works with either.

The result is a normal Hugging Face checkpoint (safetensors, bf16 by default) with its
tokenizer and a ``metrics.json`` (accuracy on held-out pretraining phrasings and on the
unseen downstream phrasings, per-task expert usage at the last prompt token, steps, wall
time, seed). Deterministic for a seed at a fixed step count (``--steps``); ``--minutes``
is only a safety cap, and metrics say when it cut the run short.

    python -m bench.synthetic.pretrain --data DIR --out DIR --seed 0
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer

from bench.synthetic.tasks import Row, read_jsonl, words

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Prompt wrappers seen in pretraining, half each: raw, and the tuner's default loglik template.
WRAPPERS = ("{q}", "question: {q}\nanswer:")
EXTRA_WORDS = ("question", "answer", ":", ".", "?", ",")
DOWNSTREAM_SPLITS = ("train", "val")  # never "test": pretraining choices must not see it
N_HELDOUT = 1000

ARCHS: dict[str, tuple[str, str]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run (saved beside the checkpoint)."""

    arch: str = field(default="olmoe", metadata={"help": "olmoe or qwen3moe"})
    seed: int = 0
    steps: int = 1200
    minutes: float = 10.0
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    experts: int = 16
    top_k: int = 2
    expert_width: int = 128
    lm_weight: float = 0.1
    aux_coef: float = 0.01
    z_coef: float = 0.001
    route_coef: float = 0.0
    qa_tasks: str = ""
    dtype: str = "bfloat16"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"--arch {self.arch!r}: unknown; choose one of {sorted(ARCHS)}")
        if self.hidden % 32 or self.hidden % self.heads:
            raise ValueError(
                f"--hidden {self.hidden}: must be a multiple of 32 and of --heads (vLLM)"
            )
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(
                f"--top-k {self.top_k}: must be between 1 and --experts {self.experts}"
            )
        if self.route_coef < 0:
            raise ValueError(f"--route-coef {self.route_coef}: must be >= 0")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r}: choose bfloat16 or float32")


def build_tokenizer(vocab_words: list[str]) -> Any:
    """A lower-casing word-level tokenizer over ``vocab_words`` (plus specials)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(vocab_words) | set(EXTRA_WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # same split as tasks.words()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=256,
    )


def build_model(cfg: PretrainConfig, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised MoE of ``cfg.arch`` (seeded by the caller)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[cfg.arch])
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        num_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        router_aux_loss_coef=cfg.aux_coef,
        experts_implementation="eager",  # batched_mm is ~70x slower on CPU
    )
    if cfg.arch == "olmoe":
        extra = dict(intermediate_size=cfg.expert_width)
    else:
        extra = dict(
            head_dim=cfg.hidden // cfg.heads,
            intermediate_size=cfg.expert_width,
            moe_intermediate_size=cfg.expert_width,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    return model_cls(config_cls(**common, **extra))


def vocab_from_data(data: Path) -> list[str]:
    """Every word of every ``*.jsonl`` row (question and choices) under ``data``."""
    vocab: set[str] = set()
    for path in sorted(Path(data).glob("*.jsonl")):
        for row in read_jsonl(path):
            vocab.update(words(row["question"]))
            for choice in row["choices"]:
                vocab.update(words(choice))
    return sorted(vocab)


@dataclass
class Encoded:
    """Rows tokenised once: prompt ids per wrapper, choice ids, answer index, task."""

    prompts: list[list[list[int]]]  # [row][wrapper] -> ids
    choices: list[list[int]]
    answers: list[int]
    tasks: list[str]


def encode(rows: list[Row], tokenizer: Any, wrappers: tuple[str, ...] = WRAPPERS) -> Encoded:
    """Tokenise ``rows`` under each wrapper; every choice must be exactly one token."""
    prompts = [
        tokenizer([w.format(q=r["question"]) for r in rows], add_special_tokens=False)["input_ids"]
        for w in wrappers
    ]
    choices = []
    for i, r in enumerate(rows):
        ids = tokenizer(r["choices"], add_special_tokens=False)["input_ids"]
        if any(len(c) != 1 or c[0] == tokenizer.unk_token_id for c in ids):
            raise ValueError(
                f"row {i} ({r['task']}): every choice must be one known word, got {r['choices']}"
            )
        choices.append([c[0] for c in ids])
    return Encoded(
        prompts=[list(p) for p in zip(*prompts, strict=True)],
        choices=choices,
        answers=[int(r["answer"]) for r in rows],
        tasks=[str(r.get("task", "")) for r in rows],
    )


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs``: (input_ids, attention_mask). Rotary positions stay 0..len-1."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


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
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


app = typer.Typer(add_completion=False)


def _opt(help: str) -> Any:
    return typer.Option(help=help)


_D = PretrainConfig()  # CLI defaults


@app.command()
def main(
    data: Annotated[Path, _opt("Folder with pretrain.jsonl (train/val.jsonl are evaluated).")],
    out: Annotated[Path, _opt("Output folder: checkpoint, tokenizer, metrics.json.")],
    seed: Annotated[int, _opt("Seed for initialisation and batch sampling.")] = _D.seed,
    steps: Annotated[int, _opt("Optimizer steps (fixes the result for a seed).")] = _D.steps,
    minutes: Annotated[
        float, _opt("Safety cap on training time; stops early if hit.")
    ] = _D.minutes,
    arch: Annotated[str, _opt("olmoe or qwen3moe.")] = _D.arch,
    batch_size: Annotated[int, _opt("Sequences per step.")] = _D.batch_size,
    lr: Annotated[float, _opt("Peak learning rate (AdamW, warm-up then cosine).")] = _D.lr,
    experts: Annotated[int, _opt("Experts per MoE layer.")] = _D.experts,
    top_k: Annotated[int, _opt("Experts per token.")] = _D.top_k,
    layers: Annotated[int, _opt("Decoder layers.")] = _D.layers,
    hidden: Annotated[int, _opt("Hidden size (multiple of 32 for vLLM).")] = _D.hidden,
    heads: Annotated[int, _opt("Attention heads (head size = hidden / heads).")] = _D.heads,
    expert_width: Annotated[int, _opt("Intermediate size of each expert.")] = _D.expert_width,
    lm_weight: Annotated[float, _opt("Weight of the LM loss on question tokens.")] = _D.lm_weight,
    aux_coef: Annotated[float, _opt("Load-balancing loss coefficient.")] = _D.aux_coef,
    z_coef: Annotated[float, _opt("Router z-loss coefficient.")] = _D.z_coef,
    route_coef: Annotated[
        float,
        _opt(
            "Task-routing supervision: each task owns experts // tasks experts and prompt "
            "tokens are pushed to route there (0: routing learns freely)."
        ),
    ] = _D.route_coef,
    qa_tasks: Annotated[
        str,
        _opt(
            "Comma-separated tasks whose pretraining prompts always carry the "
            "'question: ... answer:' wrapper while every other task's never does (a format "
            "that marks one source); default: every prompt raw or wrapped, half each."
        ),
    ] = _D.qa_tasks,
    dtype: Annotated[str, _opt("Saved weight dtype: bfloat16 or float32.")] = _D.dtype,
    threads: Annotated[int, _opt("torch CPU threads (results can depend on it).")] = _D.threads,
) -> None:
    """Pretrain a small MoE on synthetic tasks and save it as a Hugging Face checkpoint."""
    cfg = PretrainConfig(
        arch=arch,
        seed=seed,
        steps=steps,
        minutes=minutes,
        batch_size=batch_size,
        lr=lr,
        experts=experts,
        top_k=top_k,
        layers=layers,
        hidden=hidden,
        heads=heads,
        expert_width=expert_width,
        lm_weight=lm_weight,
        aux_coef=aux_coef,
        z_coef=z_coef,
        route_coef=route_coef,
        qa_tasks=qa_tasks,
        dtype=dtype,
        threads=threads,
    )
    m = pretrain(data, out, cfg)
    acc = m["accuracy"]
    typer.echo(f"{m['steps']} steps in {m['train_seconds']} s; saved {out}")
    for key, val in acc.items():
        typer.echo(f"  accuracy {key}: {val['all']:.3f}")


if __name__ == "__main__":
    app()
