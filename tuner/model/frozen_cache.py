"""``--cache-frozen-layers``: hidden states entering the lowest tuned layer, computed once, on disk.

The layers below the lowest tuned router never change during training, so their output for
a sample is the same every epoch. The cache stores, for every row of every sample, the
hidden states of its real tokens (``[length, hidden]``, in the frozen dtype) in one flat
binary file that is memory-mapped when read, plus a small JSON index written last (its
presence marks a complete cache). Batches are then assembled from the file and fed to the
lowest tuned layer (:func:`tuner.model.forward.start_at_layer`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from roma_vllm.deltas import atomic_write
from tuner.data.prompts import Encoded
from tuner.model.dtypes import DTYPES, dtype_name
from tuner.model.forward import Batch, collate, sorted_batches
from tuner.model.load import TunerModel


class _Stop(Exception):
    pass


@torch.no_grad()
def prefix_states(tm: TunerModel, batch: Batch) -> torch.Tensor:
    """Hidden states ``[rows, seq, hidden]`` entering layer ``tm.layers[0]`` (no grad)."""
    got: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        got["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = tm.decoder.layers[tm.layers[0]].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tm.decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["h"]


class PrefixCache:
    """Per-row prefix hidden states in a memory-mapped file."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = Path(path)
        self.hidden = int(index["hidden"])
        self.dtype = DTYPES[index["dtype"]]
        self.offsets = {(int(s), int(j)): (int(o), int(n)) for s, j, o, n in index["rows"]}
        total = int(index["elements"])
        self.data = torch.from_file(str(self.path), shared=False, size=total, dtype=self.dtype)

    @staticmethod
    def index_path(path: Path) -> Path:
        return Path(str(path) + ".json")

    @classmethod
    def open(cls, path: Path) -> PrefixCache | None:
        """The cache at ``path`` if it is complete, else None."""
        idx = cls.index_path(path)
        if not (idx.is_file() and Path(path).is_file()):
            return None
        return cls(path, json.loads(idx.read_text()))

    @classmethod
    def build(
        cls,
        tm: TunerModel,
        encoded: Sequence[Encoded],
        batch_size: int,
        path: Path,
        pad_id: int,
        progress: Callable[[int], None] | None = None,
    ) -> PrefixCache:
        """Compute the prefix states of every sample and write the cache atomically."""
        rows: list[list[int]] = []
        dtype = next(p for p in tm.decoder.layers[0].parameters()).dtype
        hidden = 0
        offset = 0

        def write(tmp: str) -> None:
            nonlocal hidden, offset
            with open(tmp, "wb") as f:
                for idx in sorted_batches(encoded, batch_size):
                    batch = collate(encoded, idx, pad_id).to(tm.device)
                    states = prefix_states(tm, batch).to("cpu", dtype)
                    hidden = states.shape[-1]
                    for r, (s, j) in enumerate(batch.rows):
                        n = batch.row_lengths[r]
                        chunk = states[r, :n].contiguous()
                        f.write(chunk.view(torch.uint8).numpy().tobytes())
                        rows.append([idx[s], j, offset, n])
                        offset += n * hidden
                    if progress:
                        progress(len(idx))

        atomic_write(path, write)
        name = dtype_name(dtype)
        index = {"hidden": hidden, "dtype": name, "elements": offset, "rows": rows}
        atomic_write(cls.index_path(path), lambda tmp: Path(tmp).write_text(json.dumps(index)))
        return cls(path, index)

    def remapped(self, indices: Sequence[int]) -> PrefixCache:
        """A view for a subset of the samples: local sample ``k`` is sample ``indices[k]``.

        For passes over part of the data (a data-parallel rank's share of a snapshot).
        """
        local = {g: k for k, g in enumerate(indices)}
        view = copy.copy(self)
        view.offsets = {(local[s], j): v for (s, j), v in self.offsets.items() if s in local}
        return view

    def states(self, batch: Batch) -> torch.Tensor:
        """Padded ``[rows, seq, hidden]`` prefix states of ``batch`` (zeros at padding)."""
        width = batch.input_ids.shape[1]
        out = torch.zeros((len(batch.rows), width, self.hidden), dtype=self.dtype)
        for r, (s, j) in enumerate(batch.rows):
            o, n = self.offsets[(batch.indices[s], j)]
            off = width - n if batch.left_padded else 0
            out[r, off : off + n] = self.data[o : o + n * self.hidden].view(n, self.hidden)
        return out
