"""Checkpoint weights for ``from_pretrained``, read tensor by tensor with ``pread``.

By default transformers memory-maps every shard and materialises tensors on four worker
threads ahead of the conversions that consume them: the mapped pages of the whole
checkpoint and the in-flight copies sit in the process's RSS beside the loaded model. On the
OLMoE-1B-7B-shaped bench model (13.8 GB bf16) that peaks at 21 GB, 1.5x the checkpoint.
Handing ``from_pretrained`` lazy ``pread`` slices instead (safetensors' own backend, the one
transformers uses on Windows) and loading sequentially (transformers'
``HF_DEACTIVATE_ASYNC_LOAD``) reads each tensor once, straight into its destination: peak
14.6 GB (1.06x), for the same weights. ``python -m bench.realsize`` measures it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import safe_open

from roma_vllm.checkpoint import safetensors_files

SEQUENTIAL = "HF_DEACTIVATE_ASYNC_LOAD"  # transformers: no thread pool when loading


@contextmanager
def pread_state_dict(ckpt: Path) -> Iterator[dict[str, Any]]:
    """Name -> lazy ``pread`` slice for every tensor of ``ckpt``, with sequential loading on.

    The slices read nothing until transformers indexes them; the files are closed and the
    loading mode restored on exit.
    """
    handles = []
    previous = os.environ.get(SEQUENTIAL)
    try:
        state: dict[str, Any] = {}
        for path in safetensors_files(ckpt):
            handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
            handles.append(handle)
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                state[name] = handle.get_slice(name)
        os.environ[SEQUENTIAL] = "1"
        yield state
    finally:
        if previous is None:
            os.environ.pop(SEQUENTIAL, None)
        else:
            os.environ[SEQUENTIAL] = previous
        for handle in handles:
            handle.__exit__(None, None, None)
