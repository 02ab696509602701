"""The configuration of one `roma-tune run`: every field, its default and its help text.

Defaults follow the authors' code (AdamW, lr 7e-5, weight decay 0.01, 3 epochs, batch 32,
lambda 0.8 with linear warm-up, sigma 0.4) and the paper's best ablation (last 5 routers,
k = 3 nearest successful neighbours). Tiny models need a much larger learning rate
(1e-3 to 1e-2). The whole config is saved with the run (``RUN_DIR/config.json``) and inside
the delta file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from roma_vllm.errors import RomaError

SCORING_CHOICES = ("letter", "loglik")
REFRESH_CHOICES = ("epoch", "never")
ROUTING_VECTOR_CHOICES = ("probs", "log-probs")
ROUTER_GRAD_CHOICES = ("topk", "dense")
DTYPE_CHOICES = ("auto", "bfloat16", "float32")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# transformers' from_pretrained(device_map=...) strategies
DEVICE_MAP_CHOICES = ("auto", "balanced", "sequential")
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
LAYERS_RE = re.compile(r"all|last\d+|\d+(-\d+)?(,\d+(-\d+)?)*")

# Fields that do not change what a run computes, left out of the hash that keys its caches.
_NOT_HASHED = {"out", "resume", "overwrite", "device", "device_map", "micro_batch_size"}


class ConfigError(RomaError, ValueError):
    """A run option is invalid; the message names the flag."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TuneConfig:
    """Everything that defines a RoMA router-tuning run."""

    model: str = _f("", "Hugging Face MoE checkpoint: a local folder or a Hub name.")
    data: str = _f(
        "",
        "Training data: .jsonl/.json/.csv file, hf:NAME[:CONFIG]:SPLIT, a datasets folder or "
        "lm-eval:TASK[:SPLIT][=LOCAL_COPY] (needs --scoring loglik). Rows: {question, choices, "
        "answer[, task]} or {prompt, completion}; other column names: "
        "'FILE{question=goal,choices=sol1|sol2,answer=label,answer-base=1}'. A mixture: "
        "sources separated by commas, SOURCE@N keeps N rows drawn with --seed. Check a spec "
        "with `roma-tune data SPEC`.",
    )
    out: str = _f("", "Run directory: deltas, config.json, log, caches and checkpoints.")
    val: str | None = _f(None, "Optional validation data (same formats): accuracy each epoch.")
    scoring: str = _f(
        "letter",
        "Multiple-choice scoring: 'letter' (letters listed in the prompt, CE over the letter "
        "tokens) or 'loglik' (each choice a continuation, CE over summed log-likelihoods).",
    )
    template: str | None = _f(
        None,
        "Prompt template with {question}/{prompt}, {choices}, {task}; a file path or the text. "
        "Default: 'Question: {question}\\n{choices}\\nAnswer:' (letter), "
        "'Question: {question}\\nAnswer:' (loglik), '{prompt}' (free-form).",
    )
    chat_template: bool = _f(False, "Wrap the rendered prompt in the model's chat template.")
    layers: str | None = _f(
        None,
        "Routers to tune: 'all', 'lastN', or layer indices such as '12,13,15' or '10-15'. "
        "Default: the last 5 MoE layers (all of them when the model has fewer).",
    )
    k: int = _f(3, "Nearest successful neighbours per sample (the paper's best is 3).")
    eps: float | None = _f(
        None, "Use an epsilon-ball instead of kNN: every successful sample with cosine >= EPS."
    )
    sigma: float = _f(0.4, "Gaussian kernel width over cosine distance: exp(-d^2 / 2 sigma^2).")
    lam: float = _f(0.8, "Weight lambda of the manifold term; 0 gives plain router tuning.")
    lr: float = _f(7e-5, "AdamW learning rate (tiny models need ~1e-3 or more).")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    epochs: int = _f(3, "Training epochs.")
    batch_size: int = _f(32, "Samples per optimiser step.")
    micro_batch_size: int | None = _f(
        None,
        "Samples per forward/backward pass (default: the whole --batch-size). Gradients "
        "accumulate over micro-batches, so the update is the same (within float rounding) "
        "with less memory.",
    )
    max_length: int | None = _f(
        None,
        "Cut prompts from the left so each sequence (prompt + longest choice or completion) "
        "fits in N tokens; the number of rows cut is reported and recorded.",
    )
    deterministic: bool = _f(
        False,
        "Use torch's deterministic algorithms (same seed, same deltas on CUDA too; slower). "
        "Without it CUDA runs agree to float tolerance only.",
    )
    warmup: float = _f(0.1, "Fraction of steps over which lr and lambda rise linearly from 0.")
    refresh: str = _f(
        "epoch",
        "'epoch': recompute neighbours' routing vectors and the successful set with the "
        "current routers at the start of each epoch; 'never': keep the initial snapshot.",
    )
    routing_vector: str = _f(
        "probs",
        "What r_i is, per tuned layer at the last prompt token: 'probs', the softmax over "
        "experts (the paper's), or 'log-probs', its logarithm (weighs the experts a sample "
        "does not pick as much as those it picks).",
    )
    router_grad: str = _f(
        "topk",
        "How the routers get their gradient: 'topk', through the weights of the experts each "
        "token picked (plain backprop); 'dense', straight-through: the forward stays the "
        "model's top-k output, the backward is that of the mixture of ALL experts weighted by "
        "the router's full distribution (softmax; DeepSeek-V3: sigmoid scores normalised to "
        "sum 1), so a router learns about experts it did not pick. Costs about "
        "experts/top-k times the expert compute of the tuned layers in training.",
    )
    seed: int = _f(0, "Random seed: the same seed gives the same deltas.")
    dtype: str = _f(
        "auto",
        "dtype of the frozen weights (routers always train in float32): 'auto' is bfloat16 "
        "when training on CUDA and float32 on CPU (bf16 matmuls are ~10x slower on CPUs "
        "without native bf16); or 'bfloat16' / 'float32'. The resolved dtype is recorded in "
        "config.json and the delta metadata.",
    )
    cache_frozen_layers: bool = _f(
        False,
        "Cache the frozen layers' output: store the hidden states entering the lowest tuned layer on disk and reuse them "
        "instead of recomputing the frozen layers below it.",
    )
    embedder: str = _f(
        DEFAULT_EMBEDDER, "sentence-transformers model for task embeddings (name or path)."
    )
    skip_bad_rows: bool = _f(False, "Skip and count bad data rows instead of stopping.")
    limit: int | None = _f(None, "Use only the first N training rows.")
    resume: bool = _f(False, "Continue an interrupted run from its last epoch checkpoint.")
    overwrite: bool = _f(
        False,
        "Delete the checkpoints of an earlier training of this configuration (finished or "
        "not) and train from scratch; cached stages are still reused.",
    )
    trust_remote_code: bool = _f(
        False, "Allow the checkpoint's own modelling code (only if you trust it)."
    )
    device: str = _f(
        "auto",
        "Device: 'auto' (cuda when available), 'cpu' or 'cuda'. Under torchrun each process "
        "uses the GPU of its LOCAL_RANK.",
    )
    device_map: str | None = _f(
        None,
        "Spread a model too large for one device over all visible GPUs: 'auto', 'balanced' "
        "or 'sequential' (transformers' device_map; needs accelerate). Frozen layers are "
        "sharded, each tuned router trains on the device holding it, the loss is gathered on "
        "the input device. One process only: not with torchrun.",
    )
    max_grad_norm: float | None = _f(1.0, "Clip router gradients to this norm (none to disable).")

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{flag}: {msg}")

        need(
            self.scoring in SCORING_CHOICES,
            "--scoring",
            f"must be one of {', '.join(SCORING_CHOICES)}, got {self.scoring!r}",
        )
        need(
            self.refresh in REFRESH_CHOICES,
            "--refresh",
            f"must be one of {', '.join(REFRESH_CHOICES)}, got {self.refresh!r}",
        )
        need(
            self.routing_vector in ROUTING_VECTOR_CHOICES,
            "--routing-vector",
            f"must be one of {', '.join(ROUTING_VECTOR_CHOICES)}, got {self.routing_vector!r}",
        )
        need(
            self.router_grad in ROUTER_GRAD_CHOICES,
            "--router-grad",
            f"must be one of {', '.join(ROUTER_GRAD_CHOICES)}, got {self.router_grad!r}",
        )
        need(
            self.dtype in DTYPE_CHOICES,
            "--dtype",
            f"must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}",
        )
        need(
            self.device in DEVICE_CHOICES,
            "--device",
            f"must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}",
        )
        need(
            self.device_map is None or self.device_map in DEVICE_MAP_CHOICES,
            "--device-map",
            f"must be one of {', '.join(DEVICE_MAP_CHOICES)}, got {self.device_map!r}",
        )
        need(
            self.device_map is None or self.device == "auto",
            "--device-map",
            f"decides where each layer goes; leave out --device {self.device}",
        )
        need(self.k >= 1, "--k", f"must be at least 1, got {self.k}")
        need(self.eps is None or 0 < self.eps <= 1, "--eps", f"must be in (0, 1], got {self.eps}")
        need(self.sigma > 0, "--sigma", f"must be positive, got {self.sigma}")
        need(self.lam >= 0, "--lambda", f"must be >= 0, got {self.lam}")
        need(self.lr > 0, "--lr", f"must be positive, got {self.lr}")
        need(self.weight_decay >= 0, "--weight-decay", f"must be >= 0, got {self.weight_decay}")
        need(self.epochs >= 1, "--epochs", f"must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, "--batch-size", f"must be at least 1, got {self.batch_size}")
        need(
            self.micro_batch_size is None or self.micro_batch_size >= 1,
            "--micro-batch-size",
            f"must be at least 1, got {self.micro_batch_size}",
        )
        need(
            self.max_length is None or self.max_length >= 2,
            "--max-length",
            f"must be at least 2, got {self.max_length}",
        )
        need(0 <= self.warmup < 1, "--warmup", f"must be a fraction in [0, 1), got {self.warmup}")
        need(
            self.limit is None or self.limit >= 1,
            "--limit",
            f"must be at least 1, got {self.limit}",
        )
        need(not (self.resume and self.overwrite), "--overwrite", "cannot be used with --resume")
        need(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "--max-grad-norm",
            f"must be positive, got {self.max_grad_norm}",
        )
        if self.layers is not None:
            self.layers = self.layers.replace(" ", "")
            need(
                LAYERS_RE.fullmatch(self.layers) is not None,
                "--layers",
                f"expected 'all', 'lastN' or indices like '3,5' or '2-5', got {self.layers!r}",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"config: unknown keys {unknown}")
        return cls(**values)

    def hash(self, *names: str) -> str:
        """Hash of the named fields (all that change results when none are named)."""
        d = self.to_dict()
        keys = names or tuple(k for k in d if k not in _NOT_HASHED)
        blob = json.dumps({k: d[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


HELP: dict[str, str] = {f.name: f.metadata["help"] for f in fields(TuneConfig)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TuneConfig)}


def read_template(value: str | None) -> str | None:
    """``--template``: a file's text when the value names an existing file, else the value."""
    if value is None:
        return None
    p = Path(value)
    if len(value) < 4096 and "\n" not in value and p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"--template {value}: not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
    return value
