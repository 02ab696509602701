"""What determines a pretraining run: the settings (saved beside the checkpoint) and the
fixed choices of the tokenizer and prompt formats."""

from __future__ import annotations

from dataclasses import dataclass, field

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
