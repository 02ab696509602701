"""Weights read with pread (tuner.model.weights) load the same model transformers' own
memory-mapped loading does, for every architecture, from a sharded checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ALL_ARCHITECTURES
from safetensors.torch import save_file

from roma_vllm.checkpoint import checkpoint_shapes, safetensors_files
from tuner.model.load import load_model
from tuner.model.weights import SEQUENTIAL, pread_state_dict


def _resharded(src: Path, dst: Path) -> Path:
    """``src`` re-saved by transformers in small shards (an index file names them)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(dst, max_shard_size="200KB")
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".json")) or f.name == "tokenizer_config.json":
            shutil.copy(f, dst / f.name)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_pread_load_equals_transformers_own(
    arch: str, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    ckpt = _resharded(tiny_model(arch), tmp_path / "sharded")
    assert len(safetensors_files(ckpt)) > 1
    ours = load_model(str(ckpt), dtype="float32", device="cpu", train_routers=False).model
    theirs = getattr(transformers, arch).from_pretrained(ckpt, dtype=torch.float32)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert sorted(mine) == sorted(ref)
    for name, value in ref.items():
        assert torch.equal(mine[name], value), name
    assert SEQUENTIAL not in os.environ  # restored after loading


def test_shards_come_from_the_index(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """A stray ``*.safetensors`` beside an indexed checkpoint (Mistral's consolidated file)
    is not read."""
    ckpt = _resharded(tiny_model("OlmoeForCausalLM"), tmp_path / "sharded")
    save_file({"junk": torch.zeros(3)}, ckpt / "consolidated.safetensors")
    indexed = set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    assert set(checkpoint_shapes(ckpt)) == indexed
    with pread_state_dict(ckpt) as state:
        assert set(state) == indexed
        assert os.environ[SEQUENTIAL] == "1"
    assert SEQUENTIAL not in os.environ
