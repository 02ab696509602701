"""`roma-tune merge`: routers become base + scale * delta, everything else is kept bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stored_tensors
from typer.testing import CliRunner

from roma_vllm.deltas import RouterDeltas, make_deltas, read_deltas, write_deltas
from tuner.cli.app import app
from tuner.export.merge import MERGE_RECORD, merge


def _deltas(model_dir: Path, layers: set[int] | None = None) -> RouterDeltas:
    """Random router deltas (a third of each router's spread) for ``layers`` (default all)."""
    from roma_vllm.architectures import architecture_of, find_routers, num_experts
    from roma_vllm.checkpoint import checkpoint_shapes, checkpoint_tensors, load_config

    config = load_config(model_dir)
    arch = architecture_of(config)
    routers = find_routers(arch, checkpoint_shapes(model_dir), num_experts(config))
    names = [n for n, layer in routers.items() if layers is None or layer in layers]
    base = checkpoint_tensors(model_dir, names)
    g = torch.Generator().manual_seed(3)
    tuned = {
        n: t.float() + t.float().std() / 3 * torch.randn(t.shape, generator=g)
        for n, t in base.items()
    }
    return make_deltas(base, tuned, arch, str(model_dir))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _bf16_plus_scaled_delta(base: torch.Tensor, delta: torch.Tensor, scale: float) -> np.ndarray:
    """The bf16 bit patterns of ``base + scale * delta``, written out without torch's casts.

    bf16 is the upper half of a float32: widen by shifting the bits up, add in float32 (numpy),
    then narrow by rounding to nearest, ties to even, on the dropped lower 16 bits.
    """
    assert base.dtype == torch.bfloat16
    b16 = base.contiguous().view(torch.int16).numpy().astype(np.uint16)
    wide = (b16.astype(np.uint32) << 16).view(np.float32)
    total = wide + np.float32(scale) * delta.numpy().astype(np.float32)
    assert np.isfinite(total).all()  # no NaN/Inf rounding rules needed
    u = total.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bf16 tiny Qwen3-MoE saved in several shards, and deltas for two of its layers."""
    import transformers

    from roma_vllm.testing.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("merge")
    single = build_tiny_model(root / "single", "Qwen3MoeForCausalLM", dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(single), dtype=torch.bfloat16)
    sharded = root / "sharded"
    model.save_pretrained(sharded, max_shard_size="300KB")
    transformers.AutoTokenizer.from_pretrained(str(single)).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    return sharded, write_deltas(root / "deltas.safetensors", _deltas(sharded, {2, 3}))


def test_merged_routers_and_other_tensors(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    model, deltas_path = sharded
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app,
        ["merge", "--model", str(model), "--deltas", str(deltas_path), "--out", str(out),
         "--scale", "0.5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    deltas = read_deltas(deltas_path)
    base, merged = stored_tensors(model), stored_tensors(out)
    assert set(base) == set(merged)
    for name, t in base.items():
        assert merged[name].dtype == t.dtype and merged[name].shape == t.shape
        if name in deltas.tensors:
            want = _bf16_plus_scaled_delta(t, deltas.tensors[name], 0.5)
            got = merged[name].contiguous().view(torch.int16).numpy().astype(np.uint16)
            assert np.array_equal(got, want), name
            assert not torch.equal(merged[name], t)
        else:
            assert torch.equal(_bits(merged[name]), _bits(t)), name
    # same shard layout and index; config and tokenizer copied; the recipe recorded
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in model.glob("*.safetensors")
    )
    index = "model.safetensors.index.json"
    assert json.loads((out / index).read_text()) == json.loads((model / index).read_text())
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["scale"] == 0.5 and set(record["replaced"]) == set(deltas.tensors)
    assert not list(tmp_path.glob(".merged.*"))  # no temporary folder left behind
    assert out.stat().st_mode & 0o777 == model.stat().st_mode & 0o777  # not a private 0700


def test_merged_model_equals_in_memory_deltas(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    import transformers

    from roma_vllm.hf import apply_deltas

    model, deltas_path = sharded
    out = tmp_path / "merged"
    merge(str(model), str(deltas_path), str(out))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.bfloat16)
    apply_deltas(tuned, read_deltas(deltas_path))
    a, b = dict(merged.named_parameters()), dict(tuned.named_parameters())
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_merge_refusals(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    from roma_vllm.testing.tiny import build_tiny_model

    model, deltas_path = sharded
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        r = runner.invoke(app, ["merge", "--model", str(model), *args])
        return r.exit_code, r.output

    other = build_tiny_model(tmp_path / "other", "Qwen3MoeForCausalLM", seed=5)
    foreign = write_deltas(tmp_path / "foreign.safetensors", _deltas(other))
    code, out = run("--deltas", str(foreign), "--out", str(tmp_path / "m1"))
    assert code == 1 and "fingerprint mismatch" in out
    assert not (tmp_path / "m1").exists()
    olmoe = build_tiny_model(tmp_path / "olmoe", "OlmoeForCausalLM")
    code, out = run(
        "--deltas",
        str(write_deltas(tmp_path / "olmoe.safetensors", _deltas(olmoe))),
        "--out",
        str(tmp_path / "m2"),
    )
    assert code == 1 and "deltas are for OlmoeForCausalLM" in out
    code, out = run("--deltas", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "m3"))
    assert code == 1 and "delta file not found" in out
    (tmp_path / "taken").mkdir()
    code, out = run("--deltas", str(deltas_path), "--out", str(tmp_path / "taken"))
    assert code == 1 and "already exists" in out
    code, out = run("--deltas", str(deltas_path), "--out", str(tmp_path / "taken"), "--overwrite")
    assert code == 0 and (tmp_path / "taken" / MERGE_RECORD).is_file()
    code, out = run("--deltas", str(deltas_path), "--out", str(model), "--overwrite")
    assert code == 1 and "is the base checkpoint itself" in out


def test_merged_folder_is_synced_before_its_rename(
    sharded: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file's data reaches the disk before the folder takes its final name; the parent
    folder (which holds the rename) after."""
    import os

    model, deltas_path = sharded
    out = tmp_path / "merged"
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    merge(str(model), str(deltas_path), str(out))

    moved = events.index(("replace", out.stat().st_ino))  # the folder's rename into place
    synced_before = {ino for what, ino in events[:moved] if what == "fsync"}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 5
    assert {p.stat().st_ino for p in files} <= synced_before
    assert out.stat().st_ino in synced_before  # the folder's own entries
    assert ("fsync", tmp_path.stat().st_ino) in events[moved + 1 :]
