"""The delta file format: round trip, atomic writes, every validation error, HF application."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from roma_vllm import __version__
from roma_vllm.deltas import (
    DELTAS_FILENAME,
    FORMAT_VERSION,
    METADATA_KEY,
    DeltaError,
    RouterDeltas,
    add_delta,
    atomic_write,
    check_base_tensor,
    fingerprint,
    make_deltas,
    parse_scale,
    read_deltas,
    validate,
    write_deltas,
)

ARCH = "OlmoeForCausalLM"
R0 = "model.layers.0.mlp.gate.weight"
R3 = "model.layers.3.mlp.gate.weight"


def _deltas(**overrides: Any) -> RouterDeltas:
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(8, 32, generator=g) for n in (R0, R3)}
    tuned = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    d = make_deltas(base, tuned, ARCH, "tiny/olmoe", training={"lr": 7e-5})
    for k, v in overrides.items():
        setattr(d, k, v)
    return d


def _raises(message: str) -> Any:
    return pytest.raises(DeltaError, match=re.escape(message))


def _write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: Any) -> Path:
    raw = meta if isinstance(meta, str) or meta is None else json.dumps(meta)
    save_file(tensors, str(path), metadata=None if raw is None else {METADATA_KEY: raw})
    return path


# -- writing and reading ------------------------------------------------------------------


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    d = _deltas()
    path = write_deltas(tmp_path / "d.safetensors", d)
    back = read_deltas(path)
    assert back.tensors.keys() == d.tensors.keys()
    for n in d.tensors:
        assert back.tensors[n].dtype == torch.float32
        torch.testing.assert_close(back.tensors[n], d.tensors[n], rtol=0, atol=0)
    assert back.architecture == ARCH and back.base_model == "tiny/olmoe"
    assert back.base_fingerprints == d.base_fingerprints
    assert back.training == {"lr": 7e-5}
    assert back.format_version == FORMAT_VERSION and back.roma_vllm_version == __version__
    assert back.layers == [0, 3]
    assert back.max_abs() == pytest.approx(d.max_abs())


def test_read_accepts_a_directory_holding_the_default_name(tmp_path: Path) -> None:
    write_deltas(tmp_path / DELTAS_FILENAME, _deltas())
    assert read_deltas(tmp_path).layers == [0, 3]


def test_make_deltas_is_tuned_minus_base_in_float32() -> None:
    base = {R0: torch.ones(8, 32, dtype=torch.bfloat16)}
    tuned = {R0: torch.full((8, 32), 1.5)}
    d = make_deltas(base, tuned, ARCH, "m")
    assert d.tensors[R0].dtype == torch.float32
    assert torch.all(d.tensors[R0] == 0.5)
    assert d.base_fingerprints[R0] == fingerprint(base[R0])


def test_fingerprint_depends_on_values_and_shape_not_dtype() -> None:
    t = torch.arange(12.0).reshape(3, 4)
    assert fingerprint(t) == fingerprint(t.to(torch.bfloat16))
    assert fingerprint(t) != fingerprint(t.reshape(4, 3))
    assert fingerprint(t) != fingerprint(t + 1)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "d.safetensors"
    write_deltas(target, _deltas())
    before = target.read_bytes()

    def crash(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"]  # no temp file left behind


def test_write_refuses_invalid_deltas_and_writes_nothing(tmp_path: Path) -> None:
    d = _deltas()
    d.tensors[R0][0, 0] = float("nan")
    with _raises(f"{tmp_path / 'd.safetensors'}: tensor '{R0}' holds NaN or Inf values"):
        write_deltas(tmp_path / "d.safetensors", d)
    assert os.listdir(tmp_path) == []


# -- every read/validation error, by type and message --------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with _raises(f"{tmp_path / 'x.safetensors'}: delta file not found"):
        read_deltas(tmp_path / "x.safetensors")


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_text("hello")
    with _raises(f"{p}: not a readable safetensors file"):
        read_deltas(p)


def test_no_roma_metadata(tmp_path: Path) -> None:
    p = _write_raw(tmp_path / "x.safetensors", _deltas().tensors, None)
    with _raises(f"{p}: no 'roma' metadata; not a roma-vllm delta file"):
        read_deltas(p)


def test_metadata_not_json(tmp_path: Path) -> None:
    p = _write_raw(tmp_path / "x.safetensors", _deltas().tensors, "{not json")
    with _raises(f"{p}: metadata 'roma' is not valid JSON"):
        read_deltas(p)


def test_unknown_format_version(tmp_path: Path) -> None:
    d = _deltas()
    p = _write_raw(tmp_path / "x.safetensors", d.tensors, {**d.metadata(), "format_version": 2})
    with _raises(f"{p}: unknown format_version 2 (this roma-vllm reads 1)"):
        read_deltas(p)


@pytest.mark.parametrize("field", ["architecture", "base_model", "base_fingerprints"])
def test_missing_metadata_field(tmp_path: Path, field: str) -> None:
    d = _deltas()
    meta = d.metadata()
    del meta[field]
    p = _write_raw(tmp_path / "x.safetensors", d.tensors, meta)
    with _raises(f"{p}: metadata field '{field}' is missing"):
        read_deltas(p)


def test_empty(tmp_path: Path) -> None:
    with _raises("here: holds no tensors"):
        validate(_deltas(tensors={}), "here")


def test_name_that_is_not_a_router() -> None:
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    d = _deltas()
    d.tensors[name] = torch.zeros(4, 4)
    with _raises(f"here: tensor '{name}' is not a router of {ARCH}"):
        validate(d, "here")


def test_integer_tensor() -> None:
    d = _deltas()
    d.tensors[R0] = torch.zeros(8, 32, dtype=torch.int32)
    with _raises(f"here: tensor '{R0}' has dtype torch.int32, expected float32"):
        validate(d, "here")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(value: float) -> None:
    d = _deltas()
    d.tensors[R3][1, 2] = value
    with _raises(f"here: tensor '{R3}' holds NaN or Inf values"):
        validate(d, "here")


def test_tensor_without_fingerprint() -> None:
    d = _deltas()
    del d.base_fingerprints[R3]
    with _raises(f"here: tensor '{R3}' has no base fingerprint in the metadata"):
        validate(d, "here")


def test_errors_name_the_file_read(tmp_path: Path) -> None:
    d = _deltas()
    meta = d.metadata()
    meta["architecture"] = "MixtralForCausalLM"  # OLMoE names are not Mixtral routers
    p = _write_raw(tmp_path / "x.safetensors", d.tensors, meta)
    with _raises(f"{p}: tensor '{R0}' is not a router of MixtralForCausalLM"):
        read_deltas(p)


# -- checks against base tensors, application ---------------------------------------------


def test_check_base_tensor_shape_and_fingerprint() -> None:
    g = torch.Generator().manual_seed(0)
    base = {R0: torch.randn(8, 32, generator=g)}
    d = make_deltas(base, {R0: base[R0] + 1}, ARCH, "tiny/olmoe")
    check_base_tensor(d, R0, base[R0], "here")
    with _raises(f"here: tensor '{R0}' has shape (8, 32) but the model's is (8, 16)"):
        check_base_tensor(d, R0, torch.zeros(8, 16), "here")
    with _raises(
        f"here: tensor '{R0}' was made for different base weights (fingerprint mismatch; "
        "deltas made from 'tiny/olmoe'); set roma_allow_mismatch=true to apply anyway"
    ):
        check_base_tensor(d, R0, base[R0] + 1, "here")
    check_base_tensor(d, R0, base[R0] + 1, "here", allow_mismatch=True)
    with _raises("has shape"):  # the override never forgives a shape
        check_base_tensor(d, R0, torch.zeros(8, 16), "here", allow_mismatch=True)


def test_add_delta_in_float32_and_cast_back() -> None:
    base = torch.full((2, 2), 1.0, dtype=torch.bfloat16)
    out = add_delta(base, torch.full((2, 2), 2.0**-9), scale=1.0)
    assert out.dtype == torch.bfloat16
    # bf16 cannot hold 1 + 2^-9; adding in float32 then rounding once gives exactly 1
    assert torch.all(out == 1.0)
    assert torch.all(add_delta(base, torch.ones(2, 2), scale=0.5) == 1.5)


@pytest.mark.parametrize(
    ("value", "message"),
    [("x", "roma_scale must be a number, got 'x'"), (float("inf"), "roma_scale must be finite")],
)
def test_parse_scale(value: Any, message: str) -> None:
    assert parse_scale("0.5", "w") == 0.5
    with _raises(f"w: {message}"):
        parse_scale(value, "w")


# -- Hugging Face models in memory --------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral(tiny_model: Any) -> Path:
    return tiny_model("MixtralForCausalLM")


def test_hf_parameter_maps_mixtral_checkpoint_names(mixtral: Path) -> None:
    from transformers import AutoModelForCausalLM

    from roma_vllm.hf import hf_parameter

    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    name = "model.layers.2.block_sparse_moe.gate.weight"  # checkpoint name
    param = hf_parameter(model, name)
    assert param is dict(model.named_parameters())["model.layers.2.mlp.gate.weight"]
    with pytest.raises(KeyError, match=re.escape("model.layers.9.mlp.gate.weight")):
        hf_parameter(model, "model.layers.9.mlp.gate.weight")


def test_apply_deltas_to_hf_model(mixtral: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from roma_vllm.checkpoint import checkpoint_tensors
    from roma_vllm.hf import apply_deltas, hf_parameter
    from roma_vllm.testing.helpers import handmade_deltas

    d = handmade_deltas(mixtral, layers=[1, 3])
    base = checkpoint_tensors(mixtral, d.tensors)
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    apply_deltas(model, d, scale=0.5)
    for name in d.tensors:
        torch.testing.assert_close(
            hf_parameter(model, name).data, base[name] + 0.5 * d.tensors[name]
        )
    untouched = "model.layers.0.block_sparse_moe.gate.weight"
    ckpt = checkpoint_tensors(mixtral, [untouched])[untouched]
    torch.testing.assert_close(hf_parameter(model, untouched).data, ckpt)
    # applying again: the base fingerprint no longer matches, and nothing changes
    before = {n: hf_parameter(model, n).data.clone() for n in d.tensors}
    with pytest.raises(DeltaError, match="was made for different base weights"):
        apply_deltas(model, d)
    for n in d.tensors:
        assert torch.equal(hf_parameter(model, n).data, before[n])
