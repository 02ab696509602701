"""The options of one evaluation, checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.config import ConfigError
from tuner.model.dtypes import DTYPES

BACKENDS = ("vllm", "hf")
VARIANTS = ("base", "tuned")
DEFAULT_SCORING = "letter"
# Margins below this count as near-ties (log-probability units): kernels of two backends
# differ by ~1e-5 in float32 and by a few 1e-2 in 16-bit formats.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


@dataclass
class EvalOptions:
    """Everything that defines one evaluation."""

    model: str
    data: str
    deltas: str | None = None
    scoring: str | None = None  # None: from the deltas' training config, else "letter"
    template: str | None = None
    chat_template: bool | None = None
    backend: str = "vllm"
    dtype: str | None = None  # None: the checkpoint's
    scale: float = 1.0
    limit: int | None = None
    skip_bad_rows: bool = False
    allow_mismatch: bool = False
    tolerance: float | None = None  # None: DEFAULT_TOLERANCE of the dtype
    batch_rows: int = 16  # HF backend: rows per forward pass
    device: str = "auto"  # HF backend: auto (cuda when available), cpu or cuda
    device_map: str | None = None  # HF backend: spread the model over devices
    trust_remote_code: bool = False
    seed: int = 0
    # vLLM backend: engine options, passed to both engines (None: vLLM's default)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # None: the longest request + 1
    enforce_eager: bool | None = None
    verbose: bool = False  # show vLLM's own log

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"--backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not math.isfinite(self.scale):
            raise ConfigError(f"--scale: must be a finite number, got {self.scale}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device: must be auto, cpu or cuda, got {self.device!r}")
        if self.tolerance is not None and self.tolerance < 0:
            raise ConfigError(f"--tolerance: must be >= 0, got {self.tolerance}")
        for flag, size in (
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--pipeline-parallel-size", self.pipeline_parallel_size),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"{flag}: must be a whole number >= 1, got {size!r}")
        util = self.gpu_memory_utilization
        if util is not None and not (math.isfinite(util) and 0 < util <= 1):
            raise ConfigError(f"--gpu-memory-utilization: must be a fraction in (0, 1], got {util}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"--max-model-len: must be >= 2 tokens, got {self.max_model_len}")
        if self.backend != "vllm":
            given = [flag for flag, value in self.engine_flags().items() if value]
            if given:
                raise ConfigError(
                    f"{given[0]}: a vLLM engine option, but --backend is {self.backend}"
                )

    def engine_flags(self) -> dict[str, bool]:
        """Which vLLM engine options were set away from their defaults, by flag."""
        return {
            "--tensor-parallel-size": self.tensor_parallel_size != 1,
            "--pipeline-parallel-size": self.pipeline_parallel_size != 1,
            "--gpu-memory-utilization": self.gpu_memory_utilization is not None,
            "--max-model-len": self.max_model_len is not None,
            "--enforce-eager": self.enforce_eager is not None,
        }

    def engine(self) -> EngineOptions:
        """The options of both vLLM engines."""
        return EngineOptions(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            trust_remote_code=self.trust_remote_code,
            verbose=self.verbose,
        )


@dataclass(frozen=True)
class EngineOptions:
    """What the vLLM backend passes to every engine it starts (base and tuned alike).

    ``None`` leaves vLLM's own default; ``max_model_len=None`` sizes the context to the
    longest request. ``verbose`` shows vLLM's log instead of capturing it.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    trust_remote_code: bool = False
    verbose: bool = False
