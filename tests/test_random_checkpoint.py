"""The 7B-shaped random checkpoint (roma_vllm.testing.olmoe_7b.write_random_checkpoint) and
the benchmark's completeness marker (bench.realsize.build), on a small config of the same
layout: the real vocabulary (50304), 2 layers, hidden 64, 8 experts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import stored_tensors
from safetensors import safe_open

from bench.realsize.build import COMPLETE, _recipe, is_complete
from roma_vllm.testing.olmoe_7b import olmoe_config, olmoe_shapes, write_random_checkpoint

SMALL = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("random") / "ckpt"
    return write_random_checkpoint(out, shard_bytes=4_000_000, **SMALL)


def test_shards_hold_every_tensor_of_the_layout_in_bf16(small: Path) -> None:
    config = json.loads((small / "config.json").read_text())
    assert config["vocab_size"] == 50304 and config["dtype"] == "bfloat16"
    expected = olmoe_shapes(olmoe_config(**SMALL))
    stored = stored_tensors(small)
    assert {n: tuple(t.shape) for n, t in stored.items()} == expected
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    shards = sorted(small.glob("*.safetensors"))
    index = json.loads((small / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(expected)
    assert len(shards) >= 3
    for f in shards:  # at most shard_bytes of data, unless one tensor alone is larger
        names = [n for n, fname in index.items() if fname == f.name]
        data = sum(stored[n].numel() * 2 for n in names)
        assert data <= 4_000_000 or len(names) == 1, f.name
    for name, fname in index.items():
        with safe_open(str(small / fname), framework="pt") as h:
            assert name in h.keys()  # noqa: SIM118
    assert not list(small.glob(".*.tmp"))


def test_weights_are_drawn_as_documented(small: Path) -> None:
    stored = stored_tensors(small)
    norms = [t for n, t in stored.items() if n.endswith("norm.weight")]
    assert norms and all(bool((t == 1).all()) for t in norms)
    routers = [t.float() for n, t in stored.items() if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    for t in routers:  # 4 / sqrt(64) = 0.5: logits decisive, as the tiny models draw them
        assert 0.4 < float(t.std()) < 0.6
    embed = stored["model.embed_tokens.weight"].float()
    assert 0.018 < float(embed.std()) < 0.022
    # every tensor has its own generator: no two weight matrices are equal
    a, b = (stored[f"model.layers.{i}.self_attn.q_proj.weight"] for i in (0, 1))
    assert not torch.equal(a, b)


def test_transformers_loads_it_and_the_tokenizer_fits_the_embedding(small: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small)
    model = AutoModelForCausalLM.from_pretrained(small, dtype=torch.bfloat16)
    assert len(tok) < model.config.vocab_size == 50304
    ids = tok("Question: which word is red? Answer:", return_tensors="pt")
    assert int(ids["input_ids"].max()) < len(tok)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 50304 and bool(torch.isfinite(logits).all())
    stored = stored_tensors(small)
    assert torch.equal(
        model.model.layers[1].mlp.gate.weight, stored["model.layers.1.mlp.gate.weight"]
    )


def test_same_seed_same_bytes_other_seed_other_bytes(small: Path, tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(folder.glob("*.safetensors")):
            h.update(f.read_bytes())
        return h.hexdigest()

    again = write_random_checkpoint(tmp_path / "again", shard_bytes=4_000_000, **SMALL)
    other = write_random_checkpoint(tmp_path / "other", shard_bytes=4_000_000, seed=1, **SMALL)
    assert digest(again) == digest(small)
    assert digest(other) != digest(small)


def test_a_build_is_complete_only_with_a_matching_marker_and_intact_files(
    small: Path, tmp_path: Path
) -> None:
    import shutil

    folder = Path(shutil.copytree(small, tmp_path / "copy"))
    assert not is_complete(folder)  # no marker: a build stopped half-way
    files = {f.name: f.stat().st_size for f in folder.iterdir()}
    marker = folder / COMPLETE
    marker.write_text(json.dumps({"recipe": _recipe(), "files": files}))
    assert is_complete(folder)
    marker.write_text(json.dumps({"recipe": {**_recipe(), "seed": 7}, "files": files}))
    assert not is_complete(folder)  # built by another recipe
    marker.write_text(json.dumps({"recipe": _recipe(), "files": files}))
    last = sorted(folder.glob("*.safetensors"))[-1]
    with last.open("r+b") as f:
        f.truncate(last.stat().st_size - 8)
    assert not is_complete(folder)  # a shard cut short
    marker.write_text("{not json")
    assert not is_complete(folder)
