"""Read router tensors straight from a Hugging Face checkpoint's safetensors files.

Used to fingerprint the base routers and to compute deltas against the exact stored values,
independent of the dtype a model was loaded in. Only safetensors is read (never pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from roma_vllm.errors import MissingFileError

# What a Hub checkpoint needs besides its weights: configs, tokenizer files (sentencepiece
# models, BPE merges and vocabularies, tiktoken ranks) and chat templates. Never pickles
# (*.bin, *.pt, *.pth, *.ckpt, *.pkl): roma-vllm reads safetensors only.
HUB_PATTERNS: tuple[str, ...] = (
    "*.json",
    "*.safetensors",
    "*.model",
    "*.model.v*",  # Mistral's tokenizer.model.v3
    "*.tiktoken",
    "merges.txt",
    "vocab.*",
    "*.jinja",  # chat_template.jinja, additional_chat_templates/*.jinja
)
REMOTE_CODE_PATTERNS: tuple[str, ...] = ("*.py",)  # only with trust_remote_code
NEVER_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def hub_patterns(trust_remote_code: bool = False) -> list[str]:
    """The ``allow_patterns`` a Hub checkpoint is fetched with."""
    return [*HUB_PATTERNS, *(REMOTE_CODE_PATTERNS if trust_remote_code else ())]


def resolve_checkpoint(model: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """A local directory for ``model``: a path, or a Hub name resolved through the local cache.

    From the Hub: weights (safetensors), configs, tokenizer files and chat templates, and the
    model's Python code only with ``trust_remote_code``.
    """
    p = Path(model)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(model),
                allow_patterns=hub_patterns(trust_remote_code),
                ignore_patterns=list(NEVER_PATTERNS),
            )
        )
    except Exception as e:
        raise MissingFileError(
            f"{model}: not a local directory and not available from the Hub ({e})"
        ) from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards: those ``model.safetensors.index.json`` names when it exists
    (a stray file beside them, such as Mistral's ``consolidated.safetensors``, is not part of
    the Hugging Face checkpoint), else every ``*.safetensors`` file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise MissingFileError(
            f"{model_dir}: no *.safetensors files (roma-vllm reads safetensors only)"
        )
    return files


def _name_to_file(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {n: model_dir / f for n, f in weight_map.items()}
    out: dict[str, Path] = {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as h:
            out.update({n: f for n in h.keys()})  # noqa: SIM118
    return out


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor name in the checkpoint with its shape (reads headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in safetensors_files(Path(model_dir)):
        with safe_open(str(f), framework="pt") as h:
            for n in h.keys():  # noqa: SIM118
                shapes[n] = tuple(h.get_slice(n).get_shape())
    return shapes


def checkpoint_tensors(
    model_dir: str | os.PathLike, names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The named tensors, as stored (dtype kept)."""
    where = _name_to_file(Path(model_dir))
    out: dict[str, torch.Tensor] = {}
    for n in names:
        if n not in where:
            raise KeyError(f"{model_dir}: checkpoint has no tensor '{n}'")
        with safe_open(str(where[n]), framework="pt") as h:
            out[n] = h.get_tensor(n)
    return out


def load_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (not a Hugging Face checkpoint directory)")
    return json.loads(path.read_text())
