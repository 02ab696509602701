"""Will the model fit? An estimate made before loading, from the checkpoint's headers.

Loading a model that does not fit gets the process killed by the kernel (CPU) or an
out-of-memory error deep inside transformers (GPU), after minutes of reading. The weights'
size is known from the safetensors headers without reading a tensor, so the run is checked
first: the weights in the run's dtype plus a margin for activations, the float32 router
masters and the optimiser must fit in the memory the device has free. Quantized checkpoints
count their weights as they will sit in memory (:func:`tuner.model.quantized.
frozen_weight_sizes`): at their dequantized size in the run's dtype where they are
dequantized, at their stored size where transformers keeps them quantized.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from roma_vllm.errors import RomaError
from tuner.model.dtypes import DTYPES, resolve_dtype

GIB = 1024**3
MARGIN = 1.15  # weights x this, plus RESERVE: activations, router masters, optimiser, runtime
RESERVE = 1 * GIB


class MemoryPlanError(RomaError, MemoryError):
    """The model cannot fit in the chosen dtype on the chosen device."""


def checkpoint_numel(checkpoint: Path) -> int:
    """Number of weights in the checkpoint, from the safetensors headers (no tensor read)."""
    from roma_vllm.checkpoint import checkpoint_shapes

    return sum(math.prod(shape) for shape in checkpoint_shapes(checkpoint).values())


def checkpoint_sizes(checkpoint: Path, device: torch.device) -> tuple[int, int]:
    """(weights loaded in the run's dtype, bytes kept as stored) from the headers."""
    from safetensors import safe_open

    from roma_vllm.checkpoint import load_config, safetensors_files
    from tuner.model.quantized import frozen_weight_sizes

    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in safetensors_files(checkpoint):
        with safe_open(str(f), framework="pt") as h:
            for n in h.keys():  # noqa: SIM118
                s = h.get_slice(n)
                headers[n] = (tuple(s.get_shape()), s.get_dtype())
    return frozen_weight_sizes(headers, load_config(checkpoint), device, str(checkpoint))


def available_bytes(device: torch.device) -> int:
    """Memory free for the model on ``device``: the GPU's free memory, or the host's
    available memory (``MemAvailable``, capped by a cgroup limit when there is one)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    avail = _meminfo_available()
    limit = _cgroup_limit()
    return min(avail, limit) if limit else avail


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def needed_bytes(numel: int, dtype: str, stored: int = 0) -> int:
    """Estimated peak memory of a run whose frozen weights are ``numel`` values of ``dtype``
    plus ``stored`` bytes of weights kept quantized."""
    return int((numel * DTYPES[dtype].itemsize + stored) * MARGIN) + RESERVE


def plan_dtype(
    dtype: str,
    device: torch.device,
    checkpoint: Path,
    echo: Callable[[str], None] | None = None,
    available: int | None = None,
) -> str:
    """The dtype to load in, after checking that the model fits.

    ``dtype`` is ``auto`` or a name of :data:`~tuner.model.dtypes.DTYPES`. ``auto`` resolves
    as :func:`resolve_dtype` does (bfloat16 on CUDA, float32 on CPU), but
    on CPU falls back to bfloat16 when float32 would not fit, and says so through ``echo``.
    Raises :class:`MemoryPlanError` naming ``--dtype`` / ``--device-map`` when even that
    does not fit. ``available`` overrides the measured free memory (tests).
    """
    chosen = resolve_dtype(dtype, device) if dtype == "auto" else dtype
    numel, stored = checkpoint_sizes(checkpoint, device)
    free = available_bytes(device) if available is None else available
    if dtype == "auto" and device.type == "cpu" and needed_bytes(numel, chosen, stored) > free:
        chosen = "bfloat16"  # half the size; too slow on CPU to be the default
        if needed_bytes(numel, chosen, stored) <= free and echo is not None:
            echo(
                f"--dtype auto: float32 needs ~{needed_bytes(numel, 'float32', stored) / GIB:.1f} GiB "
                f"but {free / GIB:.1f} GiB is available; loading in bfloat16 instead"
            )
    need = needed_bytes(numel, chosen, stored)
    if need > free:
        where = "this machine" if device.type == "cpu" else str(device)
        hint = "--dtype bfloat16, " if chosen == "float32" else ""
        raise MemoryPlanError(
            f"{checkpoint.name}: {_count(numel)} weights in {chosen} need ~{need / GIB:.1f} GiB, "
            f"{where} has {free / GIB:.1f} GiB available; use {hint}--device-map auto over "
            "several GPUs, or a larger machine"
        )
    return chosen


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
