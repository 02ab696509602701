"""``--deterministic``: torch's deterministic algorithms for the length of a run.

On CPU the tuner is deterministic already (same seed, same deltas, bit for bit). On CUDA,
scatter-adds such as the experts' ``index_add_`` accumulate in a nondeterministic order, so
two runs agree only to float tolerance unless deterministic algorithms are on; cuBLAS then
also needs a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``), set here unless already set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Within the block, torch uses deterministic algorithms when ``enabled``."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
