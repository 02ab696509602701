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
