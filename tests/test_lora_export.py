"""`roma-tune export --lora`: router deltas as a PEFT LoRA adapter, checked with each side's
own loader.

* transformers + PEFT (``PeftModel.from_pretrained``) with the adapter gives the logits of
  transformers with the deltas merged (:func:`roma_vllm.hf.apply_deltas`), float32, within
  1e-5 (B = I and scaling 1: the adapter adds the delta itself; measured 0.0 here); with the
  adapter disabled, the base logits exactly. Every supported architecture.
* vLLM's own adapter reading (``PEFTHelper.from_local_dir`` + ``validate_legal`` +
  ``LoRAModel.from_local_checkpoint``, the calls its worker makes) accepts the same folder
  and yields ``A``/``B`` per router module (the engine-level check, where vLLM's module
  names are matched, is in ``tests/test_lora_vllm.py``).
* ``--rank r``: the recorded spectral / Frobenius errors and the --data routing errors equal
  independent computations.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ALL_ARCHITECTURES
from safetensors import safe_open
from typer.testing import CliRunner

from roma_vllm.deltas import RouterDeltas, read_deltas
from roma_vllm.hf import apply_deltas
from roma_vllm.testing import write_handmade_deltas
from tuner.cli.app import app
from tuner.export.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPORT_RECORD,
    LoraExportError,
    export_lora,
)

PROMPTS = torch.tensor([[5, 17, 42, 9, 100, 33, 7, 250], [60, 61, 62, 63, 64, 65, 66, 67]])
TOLERANCE = 1e-5  # float32 logits, adapter vs merged


def _weights_only(deltas: RouterDeltas) -> RouterDeltas:
    """The deltas a LoRA can carry: router weights, no bias (GPT-OSS)."""
    keep = {n: t for n, t in deltas.tensors.items() if not n.endswith(".bias")}
    fps = {n: deltas.base_fingerprints[n] for n in keep}
    return RouterDeltas(keep, deltas.architecture, deltas.base_model, fps, deltas.training)


def _load(model_dir: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


@torch.no_grad()
def _logits(model: Any) -> torch.Tensor:
    return model.eval()(PROMPTS).logits


def _adapter_tensors(adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def exported(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``exported(arch)`` -> (model dir, delta file, exact adapter dir), once per arch."""
    root = tmp_path_factory.mktemp("lora_export")
    done: dict[str, tuple[Path, Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path, Path]:
        if arch not in done:
            model = tiny_model(arch)
            deltas = write_handmade_deltas(model, root / f"{arch}.safetensors", noise=0.5)
            adapter = root / f"{arch}-adapter"
            export_lora(str(deltas), str(adapter), drop_bias=arch == "GptOssForCausalLM")
            done[arch] = (model, deltas, adapter)
        return done[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_peft_adapter_gives_the_merged_logits(exported: Any, arch: str) -> None:
    from peft import PeftModel

    model_dir, deltas_path, adapter = exported(arch)
    deltas = _weights_only(read_deltas(deltas_path))
    base = _load(model_dir)
    base_logits = _logits(base)
    merged = copy.deepcopy(base)
    apply_deltas(merged, deltas)
    want = _logits(merged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(adapter))
    got = _logits(peft_model)
    # PEFT warns about config keys it does not know and adapter keys it could not place
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()]
    assert (want - base_logits).abs().max() > 0.1  # the deltas do change the output
    torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model), base_logits)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_vllm_reads_the_adapter_with_its_own_loader(exported: Any, arch: str) -> None:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models import ModelRegistry

    model_dir, deltas_path, adapter = exported(arch)
    deltas = _weights_only(read_deltas(deltas_path))
    experts = next(iter(deltas.tensors.values())).shape[0]
    helper = PEFTHelper.from_local_dir(str(adapter), max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=experts))
    with pytest.raises(ValueError, match=f"LoRA rank {experts} is greater than max_lora_rank 1"):
        helper.validate_legal(LoRAConfig(max_lora_rank=1))
    assert helper.vllm_lora_scaling_factor == 1.0
    # the worker passes the model class's renaming rules to the reader
    model_cls = ModelRegistry._try_load_model_cls(arch)
    mapper = getattr(model_cls, "hf_to_vllm_mapper", None)
    router = "router" if arch == "GptOssForCausalLM" else "gate"
    lora = LoRAModel.from_local_checkpoint(
        str(adapter),
        expected_lora_modules={router},
        peft_helper=helper,
        lora_model_id=1,
        device="cpu",
        dtype=torch.float32,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
    )
    modules = {n.removesuffix(".weight"): t for n, t in deltas.tensors.items()}
    assert sorted(lora.loras) == sorted(modules)
    for name, delta in modules.items():
        weights = lora.loras[name]
        assert weights.scaling == 1.0
        assert torch.equal(weights.lora_b @ weights.lora_a, delta)  # B = I, A = delta


def test_metadata_travels_with_the_adapter(exported: Any) -> None:
    model_dir, deltas_path, adapter = exported("GptOssForCausalLM")
    deltas = read_deltas(deltas_path)
    _, meta = _adapter_tensors(adapter)
    in_file = json.loads(meta["roma"])
    beside = json.loads((adapter / EXPORT_RECORD).read_text())
    assert in_file == beside
    assert in_file["deltas_metadata"]["base_fingerprints"] == deltas.base_fingerprints
    assert in_file["deltas_metadata"]["training"] == deltas.training
    assert in_file["dropped_bias"] == sorted(n for n in deltas.tensors if n.endswith(".bias"))
    assert in_file["exact"] is False  # the bias is missing
    assert in_file["vllm"] == {"lora_target_modules": ["router"], "max_lora_rank": 8}
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)


def test_rank_r_records_the_truncation_error(exported: Any, tmp_path: Path) -> None:
    model_dir, deltas_path, _ = exported("MixtralForCausalLM")
    deltas = read_deltas(deltas_path)
    record = export_lora(str(deltas_path), str(tmp_path / "r3"), rank=3)
    tensors, _ = _adapter_tensors(tmp_path / "r3")
    config = json.loads((tmp_path / "r3" / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], record["rank"]) == (3, 3, 3)
    spectral, frobenius = [], []
    for name, delta in deltas.tensors.items():
        module = "base_model.model." + name.removesuffix(".weight")
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        assert (tuple(a.shape), tuple(b.shape)) == ((3, delta.shape[1]), (delta.shape[0], 3))
        rest = (delta - b @ a).double()
        mine = record["truncation"]["tensors"][name]
        assert mine["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(rest, 2)), 1e-4)
        assert mine["frobenius"] == pytest.approx(float(torch.linalg.matrix_norm(rest)), 1e-4)
        spectral.append(mine["spectral"])
        frobenius.append(mine["frobenius"])
    assert record["truncation"]["max_spectral_error"] == max(spectral) > 0
    assert record["truncation"]["max_frobenius_error"] == max(frobenius)


@pytest.mark.slow
def test_rank_r_peft_parity_and_routing_error_on_data(exported: Any, tmp_path: Path) -> None:
    """The adapter PEFT loads is the truncated one, and the recorded routing error on --data
    equals the one computed here from plain transformers forwards, one prompt at a time."""
    from peft import PeftModel

    from tuner.data.prompts import encode
    from tuner.data.sources import load_examples

    model_dir, deltas_path, _ = exported("MixtralForCausalLM")
    deltas = read_deltas(deltas_path)
    data = tmp_path / "rows.jsonl"
    words = ["apple", "bread", "grape", "lemon", "pear", "cow"]
    rows = [{"question": f"Which {w} is best?", "choices": words[:3], "answer": 1} for w in words]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    record = export_lora(str(deltas_path), str(tmp_path / "r4"), rank=4, data=str(data))
    tensors, _ = _adapter_tensors(tmp_path / "r4")
    truncated = {}
    for name in deltas.tensors:
        module = "base_model.model." + name.removesuffix(".weight")
        truncated[name] = tensors[f"{module}.lora_B.weight"] @ tensors[f"{module}.lora_A.weight"]
    approx = RouterDeltas(
        truncated, deltas.architecture, deltas.base_model, deltas.base_fingerprints
    )
    base = _load(model_dir)
    exact_model, approx_model = copy.deepcopy(base), copy.deepcopy(base)
    apply_deltas(exact_model, deltas)
    apply_deltas(approx_model, approx)
    torch.testing.assert_close(
        _logits(PeftModel.from_pretrained(base, str(tmp_path / "r4"))),
        _logits(approx_model),
        atol=TOLERANCE,
        rtol=0,
    )

    def router_logits(model: Any, ids: list[int]) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        hooks = [g.register_forward_hook(lambda m, a, out: seen.append(out[0])) for g in gates]
        with torch.no_grad():
            model(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        return seen

    encoded = encode(load_examples(str(data)).examples, base_tokenizer(model_dir), "letter")
    worst, changed, routed = 0.0, 0, 0
    for e in encoded:
        for want, got in zip(
            router_logits(exact_model, e.prompt_ids),
            router_logits(approx_model, e.prompt_ids),
            strict=True,
        ):
            worst = max(worst, float((want - got).abs().max()))
            chosen = [x.topk(2).indices.sort(-1).values for x in (want, got)]
            changed += int((chosen[0] != chosen[1]).any(-1).sum())
            routed += want.shape[0]
    check = record["data_check"]
    assert check["tokens"] == sum(len(e.prompt_ids) for e in encoded)
    assert check["routed"] == routed
    assert check["changed_topk"] == changed > 0
    assert check["max_logit_error"] == pytest.approx(worst, rel=1e-4)


def base_tokenizer(model_dir: Path) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def test_bias_deltas_are_refused_unless_dropped(exported: Any, tmp_path: Path) -> None:
    _, deltas_path, _ = exported("GptOssForCausalLM")
    with pytest.raises(
        LoraExportError,
        match=r"tensor 'model\.layers\.0\.mlp\.router\.bias' is a router bias delta, which a "
        r"LoRA adapter cannot carry \(4 bias tensors\); pass --drop-bias",
    ):
        export_lora(str(deltas_path), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("rank", [0, 9])
def test_rank_out_of_range_is_refused(exported: Any, tmp_path: Path, rank: int) -> None:
    _, deltas_path, _ = exported("OlmoeForCausalLM")
    with pytest.raises(LoraExportError, match=rf"--rank: must be between 1 and 8 .*got {rank}"):
        export_lora(str(deltas_path), str(tmp_path / "a"), rank=rank)


def test_cli_writes_the_adapter_and_names_the_vllm_flags(exported: Any, tmp_path: Path) -> None:
    _, deltas_path, _ = exported("OlmoeForCausalLM")
    runner = CliRunner()
    out = tmp_path / "cli"
    missing = runner.invoke(app, ["export", "--deltas", str(deltas_path), "--out", str(out)])
    assert missing.exit_code == 1
    assert "Error: choose the export format: --lora" in missing.output
    args = ["export", "--lora", "--deltas", str(deltas_path), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"wrote LoRA adapter {out} (rank 8, 8 experts, scaling 1)",
        "serve: vllm serve MODEL --enable-lora --lora-target-modules gate --max-lora-rank 8 "
        f"--lora-modules NAME={out}",
    ]
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert f"Error: --out {out}: already exists" in again.output
