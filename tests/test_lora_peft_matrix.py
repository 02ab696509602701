"""`roma-tune export --lora` on every row of the architecture matrix: PEFT applies the adapter
exactly, or the export is refused in one line.

Per row: the row's tiny checkpoint (roma_vllm.testing.matrix), handmade router deltas (no
tuning), the export. Either the adapter was written and transformers + PEFT
(``PeftModel.from_pretrained``) give the logits of transformers with the deltas merged
(:func:`roma_vllm.hf.apply_deltas`), float32, within 1e-5 (B = I, scaling 1; most rows give
0.0), while the deltas change the logits by far more; or the export raised
:class:`PeftWouldIgnoreError` naming the architecture, a router tensor and why, and wrote
nothing. Before that check existed, the Granite rows, HYV3, PhiMoE, Step3p7 and LongCat-Flash
exported adapters that PEFT loaded without changing a logit (base routing, a warning at most).

Rows not built here: those in test_arch_matrix.UNBUILDABLE (asserted again below: building
raises the documented error) and InklingForConditionalGeneration, whose tiny build allocates
past this machine's 24 GiB (its default vision/audio towers); the CPU allocator's refusal or
the OOM killer would take other engineers' jobs with it, so it is left out here.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from test_arch_matrix import UNBUILDABLE

from roma_vllm.deltas import RouterDeltas, read_deltas
from roma_vllm.discovery import model_class
from roma_vllm.hf import apply_deltas
from roma_vllm.testing import write_handmade_deltas
from roma_vllm.testing.matrix import build_row_model, matrix_rows
from tuner.export.lora import ADAPTER_CONFIG, export_lora
from tuner.export.lora_peft import PeftWouldIgnoreError

ROWS = {row.architecture: row for row in matrix_rows()}
NOT_BUILT = {"InklingForConditionalGeneration"}
TOLERANCE = 1e-5  # float32 logits, adapter vs merged
PROMPTS = torch.tensor([[5, 17, 42, 9, 100, 33, 7, 250], [60, 61, 62, 63, 64, 65, 66, 67]])
KEYS = "PEFT's key renaming does not map the adapter's checkpoint name onto the in-memory router"
UNCALLED = "its parent's forward reads the router's weight without calling the module"
# Rows whose adapter PEFT would not apply: (first router tensor, why).
REFUSED = {
    "GraniteMoeForCausalLM": ("model.layers.0.block_sparse_moe.router.layer.weight", KEYS),
    "GraniteMoeHybridForCausalLM": ("model.layers.0.block_sparse_moe.router.layer.weight", KEYS),
    "GraniteMoeSharedForCausalLM": ("model.layers.0.block_sparse_moe.router.layer.weight", KEYS),
    "HYV3ForCausalLM": ("model.layers.1.mlp.router.gate.weight", KEYS),
    "PhiMoEForCausalLM": ("model.layers.0.block_sparse_moe.gate.weight", KEYS),
    "Step3p7ForConditionalGeneration": ("model.layers.3.moe.gate.weight", KEYS),
    "NemotronH_Omni_Reasoning_V3": ("language_model.backbone.layers.1.mixer.gate.weight", KEYS),
    "LongcatFlashForCausalLM": ("model.layers.0.mlp.router.classifier.weight", UNCALLED),
}


@pytest.fixture(scope="module")
def row_deltas(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Any:
    """``row_deltas(arch)`` -> (model dir, handmade delta file), built once per row."""
    root = tmp_path_factory.mktemp("lora_matrix")
    done: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in done:
            model = build_row_model(root / arch, ROWS[arch], tokenizer=tiny_tokenizer)
            deltas = write_handmade_deltas(model, root / f"{arch}.safetensors", noise=0.5)
            done[arch] = (model, deltas)
        return done[arch]

    return get


@torch.no_grad()
def _logits(model: Any) -> torch.Tensor:
    return model.eval()(PROMPTS).logits


@pytest.mark.parametrize("arch", sorted(set(UNBUILDABLE) & set(ROWS)))
def test_rows_not_built_for_the_export(arch: str, row_deltas: Any) -> None:
    with pytest.raises(Exception, match=UNBUILDABLE[arch]):
        row_deltas(arch)


@pytest.mark.parametrize("arch", sorted(set(ROWS) - set(UNBUILDABLE) - NOT_BUILT))
def test_peft_applies_the_export_or_it_is_refused(
    arch: str, row_deltas: Any, tmp_path: Path
) -> None:
    import transformers
    from peft import PeftModel

    model_dir, deltas_path = row_deltas(arch)
    adapter = tmp_path / "adapter"
    if arch in REFUSED:
        tensor, why = REFUSED[arch]
        with pytest.raises(PeftWouldIgnoreError) as e:
            export_lora(str(deltas_path), str(adapter), drop_bias=True)
        message = str(e.value)
        recorded = read_deltas(deltas_path).architecture  # the delta file's spelling
        assert "\n" not in message
        assert message.startswith(f"{recorded}: router '{tensor}' (in memory "), message
        assert f"PEFT would not apply it: {why}" in message, message
        assert not adapter.exists() and not list(tmp_path.glob(".adapter.*"))
        return

    export_lora(str(deltas_path), str(adapter), drop_bias=True)
    assert (adapter / ADAPTER_CONFIG).is_file()
    d = read_deltas(deltas_path)
    weights = {n: t for n, t in d.tensors.items() if not n.endswith(".bias")}  # GPT-OSS
    deltas = RouterDeltas(weights, d.architecture, d.base_model, d.base_fingerprints)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    base = model_class(config).from_pretrained(str(model_dir), dtype=torch.float32)
    base_logits = _logits(base)
    merged = copy.deepcopy(base)
    apply_deltas(merged, deltas)
    want = _logits(merged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(adapter))
    assert not [w for w in caught if re.search("missing adapter keys", str(w.message), re.I)]
    assert (want - base_logits).abs().max() > 1e-2  # the deltas change the output (1000x TOLERANCE)
    torch.testing.assert_close(_logits(peft_model), want, atol=TOLERANCE, rtol=0)
