"""`roma-tune export --lora`: router deltas as a PEFT LoRA adapter (several tuned routers
served by one vLLM server, chosen per request).

A router delta ``[E, H]`` has rank at most ``E``, so it is exactly a rank-``E`` LoRA: ``B =
I_E``, ``A = delta``, ``lora_alpha = r`` (scaling ``alpha / r = 1``, ``use_rslora`` false).
``--rank r`` (``r < E``) writes the truncated SVD instead: ``B = U_r S_r``, ``A = V_r^T``,
and records how much routing that loses (:mod:`tuner.export.lora_check` with ``--data``,
the spectral / Frobenius truncation error without).

One folder layout serves both loaders (each checked with its own loader in
``tests/test_lora_export.py``):

* tensor names are the *checkpoint* names of the routers, as PEFT saves them:
  ``base_model.model.<router module>.lora_A.weight`` / ``lora_B.weight``. vLLM's router is
  a linear layer (``GateLinear``) at exactly that module path in every supported model;
  PEFT renames checkpoint names to in-memory ones with transformers' own conversion rules
  when it loads (Mixtral's ``block_sparse_moe.gate`` -> ``mlp.gate``).
* ``adapter_config.json`` has ``target_modules: []`` and ``target_parameters``: the routers'
  *in-memory* parameter names. transformers 5 routers are not ``nn.Linear`` (PEFT's
  ``target_modules`` refuses them), but PEFT's LoRA on a parameter wraps them. vLLM reads
  only ``r``, ``lora_alpha`` and the feature flags and ignores ``target_parameters``.
* PEFT's renaming does not reach every architecture's routers (GraniteMoe's checkpoint
  ``router.layer.weight`` is ``router.weight`` in memory): PEFT would load such an adapter
  without applying it, so the export is refused (:mod:`tuner.export.lora_peft`).

The delta file's metadata (base fingerprints included) and this export's record travel in
the safetensors ``__metadata__`` (key ``roma``) and in ``roma_lora.json`` beside it, not in
``adapter_config.json``: PEFT warns "upgrade PEFT" about keys it does not know.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from roma_vllm import __version__
from roma_vllm.checkpoint import load_config, resolve_checkpoint
from roma_vllm.deltas import RouterDeltas, read_deltas
from roma_vllm.errors import RomaError
from tuner.export.lora_peft import check_peft_applies
from tuner.export.merge import _move_into_place, check_against_checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_RECORD = "roma_lora.json"
METADATA_KEY = "roma"
# vLLM 0.32's allowed --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraExportError(RomaError, ValueError):
    """The adapter cannot be written as asked; the message names the flag or tensor."""


@dataclass
class LoraFactors:
    """``B @ A`` approximates (or equals) one router weight delta."""

    lora_a: torch.Tensor  # [r, H]
    lora_b: torch.Tensor  # [E, r]
    spectral_error: float  # ||delta - B A||_2: the largest dropped singular value
    frobenius_error: float  # ||delta - B A||_F
    delta_spectral: float  # ||delta||_2, to read the errors against


def factorise(delta: torch.Tensor, rank: int | None) -> LoraFactors:
    """LoRA factors of a ``[E, H]`` delta: exact (``B = I``, ``A = delta``) when ``rank`` is
    None, else the rank-``rank`` truncated SVD with the singular values on ``B``."""
    delta = delta.detach().to("cpu", torch.float32)
    s = torch.linalg.svdvals(delta.double())
    if rank is None:
        eye = torch.eye(delta.shape[0], dtype=torch.float32)
        return LoraFactors(delta.clone(), eye, 0.0, 0.0, float(s[0]))
    u, s64, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    dropped = s64[rank:]
    return LoraFactors(
        lora_a=vh[:rank].float().contiguous(),
        lora_b=(u[:, :rank] * s64[:rank]).float().contiguous(),
        spectral_error=float(dropped.max()) if dropped.numel() else 0.0,
        frobenius_error=float(dropped.square().sum().sqrt()),
        delta_spectral=float(s[0]),
    )


def in_memory_names(checkpoint: Path, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the parameter name transformers gives it in memory (what
    PEFT's ``target_parameters`` matches), from a weightless (meta-device) model."""
    import transformers

    from roma_vllm.discovery import meta_model
    from roma_vllm.hf import hf_parameter

    # the checkpoint's own class: multimodal MoEs are no AutoModelForCausalLM
    model = meta_model(transformers.AutoConfig.from_pretrained(str(checkpoint)))
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {n: by_id[id(hf_parameter(model, n))] for n in names}


def smallest_vllm_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM 0.32 accepts that holds a rank-``rank`` LoRA."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise LoraExportError(
        f"rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}; "
        "export with --rank"
    )


def _split_bias(deltas: RouterDeltas, drop_bias: bool, where: str) -> tuple[list[str], list[str]]:
    """(weight names, dropped bias names); a bias delta is refused unless ``drop_bias``."""
    biases = sorted(n for n in deltas.tensors if n.endswith(".bias"))
    if biases and not drop_bias:
        raise LoraExportError(
            f"{where}: tensor '{biases[0]}' is a router bias delta, which a LoRA adapter cannot "
            f"carry ({len(biases)} bias tensors); pass --drop-bias to export the weights only "
            "(the served routing then lacks the tuned bias)"
        )
    return sorted(n for n in deltas.tensors if not n.endswith(".bias")), biases


def adapter_state(
    deltas: RouterDeltas, names: list[str], rank: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """(adapter tensors by PEFT name, per-tensor truncation errors, ``B @ A`` per delta)."""
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, dict[str, float]] = {}
    products: dict[str, torch.Tensor] = {}
    for name in names:
        f = factorise(deltas.tensors[name], rank)
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = f.lora_a
        tensors[f"{module}.lora_B.weight"] = f.lora_b
        errors[name] = {
            "spectral": f.spectral_error,
            "frobenius": f.frobenius_error,
            "delta_spectral": f.delta_spectral,
        }
        products[name] = f.lora_b @ f.lora_a
    return tensors, errors, products


def adapter_config(rank: int, target_parameters: list[str], base_model: str) -> dict[str, Any]:
    """PEFT's ``adapter_config.json``: plain LoRA, scaling ``alpha / r = 1``, no bias."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,  # rsLoRA would scale by alpha / sqrt(r)
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "target_modules": [],
        "target_parameters": target_parameters,
    }


def export_lora(
    deltas_path: str,
    out: str,
    model: str | None = None,
    rank: int | None = None,
    data: str | None = None,
    drop_bias: bool = False,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Write the adapter folder ``out``; returns the export record (also in ``roma_lora.json``)."""
    deltas = read_deltas(deltas_path)
    checkpoint = resolve_checkpoint(model or deltas.base_model)
    check_against_checkpoint(checkpoint, deltas, deltas_path, allow_mismatch)
    out_dir = Path(out)
    if out_dir.exists() and not overwrite:
        raise LoraExportError(f"--out {out}: already exists; choose a new folder or --overwrite")
    names, dropped = _split_bias(deltas, drop_bias, deltas_path)
    experts = deltas.tensors[names[0]].shape[0]
    if rank is not None and not 1 <= rank <= experts:
        raise LoraExportError(f"--rank: must be between 1 and {experts} (the experts), got {rank}")
    svd_rank = rank if rank is not None and rank < experts else None
    r = svd_rank or experts
    tensors, errors, products = adapter_state(deltas, names, svd_rank)
    record: dict[str, Any] = {
        "roma_vllm_version": __version__,
        "deltas": str(deltas_path),
        "base_model": deltas.base_model,
        "base_checkpoint": str(checkpoint),
        "architecture": deltas.architecture,
        "rank": r,
        "experts": experts,
        "exact": svd_rank is None and not dropped,
        "dropped_bias": dropped,
        "truncation": {
            "max_spectral_error": max(e["spectral"] for e in errors.values()),
            "max_frobenius_error": max(e["frobenius"] for e in errors.values()),
            "tensors": errors,
        },
        "vllm": {
            "lora_target_modules": sorted(
                {n.removesuffix(".weight").rsplit(".", 1)[1] for n in names}
            ),
            "max_lora_rank": smallest_vllm_rank(r),
        },
        "deltas_metadata": deltas.metadata(),
    }
    if data is not None:
        from tuner.export.lora_check import routing_error

        record["data_check"] = routing_error(
            str(checkpoint), deltas, products, data, limit=limit, config=load_config(checkpoint)
        )
    targets = in_memory_names(checkpoint, names)
    config = adapter_config(r, [targets[n] for n in names], deltas.base_model)

    def peft_applies(adapter_dir: Path) -> None:
        check_peft_applies(checkpoint, adapter_dir, targets, deltas.architecture)

    _write(out_dir, tensors, config, record, peft_applies)
    return record


def _write(
    out_dir: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    record: dict,
    check: Callable[[Path], None],
) -> None:
    """Assemble the folder beside ``out_dir``, ``check`` it (PEFT must apply it) and rename
    it into place (never half-written, never an adapter that PEFT would ignore)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        meta = {"format": "pt", METADATA_KEY: json.dumps(record, sort_keys=True)}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        check(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def summary(record: dict[str, Any], out: str) -> list[str]:
    """What `roma-tune export --lora` prints: the adapter, its fidelity and the vLLM flags."""
    r, experts = record["rank"], record["experts"]
    lines = [f"wrote LoRA adapter {out} (rank {r}, {experts} experts, scaling 1)"]
    if record["dropped_bias"]:
        lines.append(
            f"dropped {len(record['dropped_bias'])} router bias deltas (--drop-bias): the "
            "adapter serves the tuned weights with the base biases"
        )
    t = record["truncation"]
    if r < experts:
        lines.append(
            f"rank-{r} truncation: largest spectral error {t['max_spectral_error']:.4g}, "
            f"largest Frobenius error {t['max_frobenius_error']:.4g}"
        )
    check = record.get("data_check")
    if check:
        lines.append(
            f"on {check['tokens']} tokens of {check['data']}: largest router-logit error "
            f"{check['max_logit_error']:.4g}, top-{check['top_k']} choice changed at "
            f"{check['changed_topk']} of {check['routed']} token-layers "
            f"({100 * check['changed_topk_fraction']:.2f}%)"
        )
    v = record["vllm"]
    lines.append(
        f"serve: vllm serve MODEL --enable-lora --lora-target-modules "
        f"{' '.join(v['lora_target_modules'])} --max-lora-rank {v['max_lora_rank']} "
        f"--lora-modules NAME={out}"
    )
    return lines
