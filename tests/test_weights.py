"""Weights read with pread (tuner.model.weights) load the same model transformers' own
memory-mapped loading does, for every architecture, from a sharded checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from conftest import ALL_ARCHITECTURES
from safetensors.torch import save_file

import tuner.model.weights
from roma_vllm.checkpoint import checkpoint_shapes, safetensors_files
from tuner.model.load import load_model
from tuner.model.weights import SEQUENTIAL, pread_state_dict


class _CountedSlice:
    """A pread slice that records the name of each tensor read through it."""

    def __init__(self, inner: Any, name: str, reads: list[str]) -> None:
        self._inner, self._name, self._reads = inner, name, reads

    def __getitem__(self, index: Any) -> Any:
        self._reads.append(self._name)
        return self._inner[index]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


class _CountedHandle:
    """A ``safe_open`` handle whose slices record what is read through them."""

    def __init__(self, inner: Any, reads: list[str]) -> None:
        self._inner, self._reads = inner, reads

    def get_slice(self, name: str) -> _CountedSlice:
        return _CountedSlice(self._inner.get_slice(name), name, self._reads)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


def _spy_pread(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors read through ``pread_state_dict``'s slices, in order (spied at
    its ``safe_open``, whichever loading path calls it)."""
    reads: list[str] = []
    real = tuner.model.weights.safe_open

    def counted(*args: Any, **kwargs: Any) -> _CountedHandle:
        return _CountedHandle(real(*args, **kwargs), reads)

    monkeypatch.setattr(tuner.model.weights, "safe_open", counted)
    return reads


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
    arch: str, tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _resharded(tiny_model(arch), tmp_path / "sharded")
    assert len(safetensors_files(ckpt)) > 1
    reads = _spy_pread(monkeypatch)
    ours = load_model(str(ckpt), dtype="float32", device="cpu", train_routers=False).model
    # the weights came through pread, each tensor read once (not transformers' own loading)
    assert sorted(reads) == sorted(checkpoint_shapes(ckpt))
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


def test_only_the_missing_experts_switch_is_retried(
    tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model class without ``experts_implementation`` loads again on the pread path without
    it; any other TypeError (a bug) is raised, not hidden by transformers' own loading."""
    ckpt = tiny_model("OlmoeForCausalLM")
    cls = transformers.OlmoeForCausalLM
    real = cls.from_pretrained.__func__
    calls: list[bool] = []

    def without_switch(klass: type, *args: Any, **kwargs: Any) -> Any:
        calls.append("experts_implementation" in kwargs)
        if "experts_implementation" in kwargs:
            raise TypeError(
                "__init__() got an unexpected keyword argument 'experts_implementation'"
            )
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(without_switch))
    reads = _spy_pread(monkeypatch)
    tm = load_model(str(ckpt), dtype="float32", device="cpu", train_routers=False)
    assert calls == [True, False]
    assert sorted(set(reads)) == sorted(checkpoint_shapes(ckpt))
    ref = cls.from_pretrained(ckpt, dtype=torch.float32).state_dict()  # transformers' own
    mine = tm.model.state_dict()
    assert sorted(mine) == sorted(ref)
    for name, value in ref.items():
        assert torch.equal(mine[name], value), name

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("pread bug: 'NoneType' object is not subscriptable")

    monkeypatch.setattr(tuner.model.weights, "safe_open", broken)
    with pytest.raises(TypeError, match="pread bug: 'NoneType' object is not subscriptable"):
        load_model(str(ckpt), dtype="float32", device="cpu", train_routers=False)
