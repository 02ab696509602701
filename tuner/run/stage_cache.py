"""The stage cache: each stage's output in ``RUN_DIR/cache``, named by what it depends on.

A stage's key is a hash of everything that changes its output (model fingerprint, data
fingerprint, the options that matter), so a file that exists is valid and is reused:
re-running an unchanged command redoes nothing, and changing ``--k`` recomputes only the
neighbours and the training. Every file is written atomically (temp file + rename), so a
killed run never leaves a partial file under a cache name.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file

from roma_vllm.deltas import atomic_write
from tuner.config import TuneConfig
from tuner.roma.neighbours import Neighbours
from tuner.roma.snapshot import Snapshot

CACHE_DIRNAME = "cache"
# stage -> file name pattern of its output
FILES = {
    "embeddings": "embeddings-{key}.npy",
    "prefix": "prefix-{key}.bin",
    "snapshot": "snapshot-{key}.safetensors",
    "neighbours": "neighbours-{key}.npz",
}


def key(*parts: Any) -> str:
    """A short hash of ``parts`` (their ``str``), the name of a cached result."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def stage_keys(
    cfg: TuneConfig,
    model_fingerprint: str,
    data_fingerprint: str,
    layers: list[int],
    dtype: str,
) -> dict[str, str]:
    """The key of every stage's output, and of the training (its checkpoint folder)."""
    enc = key(model_fingerprint, data_fingerprint, cfg.hash("scoring", "template", "chat_template"))
    keys = {
        "embeddings": key(data_fingerprint, cfg.embedder),
        "prefix": key(enc, layers[0], dtype),
        "snapshot": key(enc, layers, dtype, cfg.routing_vector),
    }
    keys["neighbours"] = key(keys["snapshot"], keys["embeddings"], cfg.hash("k", "eps", "sigma"))
    keys["train"] = key(keys["snapshot"], keys["embeddings"], cfg.hash())
    return keys


class StageCache:
    """The cached files of one run directory."""

    def __init__(self, run_dir: Path, keys: dict[str, str]) -> None:
        self.dir = Path(run_dir) / CACHE_DIRNAME
        self.keys = keys

    def path(self, stage: str) -> Path:
        return self.dir / FILES[stage].format(key=self.keys[stage])

    def load_embeddings(self) -> np.ndarray:
        return np.load(self.path("embeddings"))

    def save_embeddings(self, emb: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, emb)
        _write_bytes(self.path("embeddings"), buf.getvalue())

    def load_snapshot(self) -> Snapshot:
        return Snapshot.from_tensors(load_file(str(self.path("snapshot"))))

    def save_snapshot(self, snap: Snapshot) -> None:
        tensors = {k: v.contiguous() for k, v in snap.tensors().items()}
        atomic_write(self.path("snapshot"), lambda tmp: save_file(tensors, tmp))

    def load_neighbours(self) -> Neighbours:
        with np.load(self.path("neighbours")) as z:
            return Neighbours(z["index"], z["weight"], z["distance"])

    def save_neighbours(self, nb: Neighbours) -> None:
        buf = io.BytesIO()
        np.savez(buf, **nb.arrays())
        _write_bytes(self.path("neighbours"), buf.getvalue())


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
