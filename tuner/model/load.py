"""Load a Hugging Face MoE model for router tuning.

Everything is frozen except the routers of the tuned layers. Frozen weights stay in the
requested dtype (``auto``: bf16 on CUDA, float32 on CPU, where bf16 matmuls are ~10x
slower); the tuned routers hold float32 master weights copied from the checkpoint's own
values, so deltas are exact. A forward pre-hook casts a tuned
router's input to float32, and the router returns float32 logits and scores, which every
supported experts implementation casts back when it accumulates into the hidden states.

Layers below the lowest tuned router need no special handling to run without autograd:
no tensor there requires grad, so autograd records nothing until the first tuned router.

With ``device_map`` (``--device-map auto``) transformers/accelerate place the frozen layers
over every visible device; each tuned router's master weight is created on the device that
holds its layer and trains there. Batches go to the input-embedding device
(:attr:`TunerModel.device`) and :func:`tuner.model.forward.forward` gathers its outputs back there,
so the loss lives on one device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from roma_vllm.architectures import (
    UnsupportedModelError,
    architecture_of,
    find_routers,
    num_experts,
    router_layers,
)
from roma_vllm.checkpoint import (
    checkpoint_shapes,
    checkpoint_tensors,
    load_config,
    resolve_checkpoint,
    safetensors_files,
)
from roma_vllm.deltas import fingerprint
from roma_vllm.errors import RomaError
from roma_vllm.hf import hf_parameter
from roma_vllm.quantization import check_routers_unquantized
from tuner.config import ConfigError
from tuner.model.dtypes import DTYPES, resolve_dtype
from tuner.model.memory import plan_dtype
from tuner.model.quantized import frozen_state_dict, loads_quantized, plain_config

DEFAULT_LAST_LAYERS = 5


class DeviceMapError(RomaError, ValueError):
    """``--device-map`` could not keep every tuned router resident on a device."""


class LayersError(RomaError, ValueError):
    """``--layers`` names layers that have no router."""


@dataclass
class TunerModel:
    """A loaded model with its tuned routers located."""

    model: Any  # transformers PreTrainedModel (CausalLM)
    tokenizer: Any
    architecture: str
    checkpoint: Path
    name: str  # as the user gave it
    moe_layers: list[int]  # every layer with a router
    layers: list[int]  # tuned layers, ascending
    tuned: dict[str, torch.nn.Parameter]  # checkpoint name -> fp32 parameter (weight, bias)
    router_modules: dict[int, torch.nn.Module]  # tuned layer -> router module
    base: dict[str, torch.Tensor]  # checkpoint name -> stored base tensor
    num_experts: int
    fingerprint: str  # identity of the base checkpoint
    dtype: str = "float32"  # resolved dtype of the frozen weights
    device_map: dict[str, str] | None = None  # module -> device, with --device-map
    _hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def device(self) -> torch.device:
        """Where batches go: the device of the input embeddings (the only one without a
        device map); forward outputs and the loss are gathered here too."""
        return self.model.get_input_embeddings().weight.device

    @property
    def decoder(self) -> Any:
        # get_decoder: Llama 4's base_model_prefix names no attribute of its causal LM
        get = getattr(self.model, "get_decoder", None)
        decoder = get() if callable(get) else None
        if decoder is None:
            decoder = getattr(self.model, self.model.base_model_prefix)
        while not hasattr(decoder, "layers") and hasattr(decoder, "model"):
            decoder = decoder.model  # a causal LM wrapped in a multimodal model
        return decoder

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable router parameters, in a fixed order."""
        return [self.tuned[n] for n in sorted(self.tuned)]

    def router_state(self) -> dict[str, torch.Tensor]:
        """Copies of the tuned routers' current float32 values, by checkpoint name."""
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.tuned.items()}

    @torch.no_grad()
    def load_router_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self.tuned.items():
            p.copy_(state[n].to(p.device, p.dtype))


def parse_layers(spec: str | None, moe_layers: list[int]) -> list[int]:
    """Tuned layer indices for ``--layers`` (None: the last 5 MoE layers, or all)."""
    if spec is None or spec == "":
        return moe_layers[-DEFAULT_LAST_LAYERS:]
    if spec == "all":
        return list(moe_layers)
    if spec.startswith("last"):
        n = int(spec[4:])
        if not 1 <= n <= len(moe_layers):
            raise LayersError(
                f"--layers: {spec} asks for {n} layers but the model has {len(moe_layers)} MoE layers"
            )
        return moe_layers[-n:]
    chosen: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        chosen.update(range(int(lo), int(hi or lo) + 1))
    missing = sorted(chosen - set(moe_layers))
    if missing:
        raise LayersError(
            f"--layers: layer(s) {missing} have no MoE router; MoE layers of this model: "
            f"{_ranges(moe_layers)}"
        )
    return sorted(chosen)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def checkpoint_fingerprint(ckpt: Path, router_names: list[str]) -> str:
    """Identity of a checkpoint: its config, file sizes and router values."""
    h = hashlib.sha256((ckpt / "config.json").read_bytes())
    for f in safetensors_files(ckpt):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    for n, t in checkpoint_tensors(ckpt, router_names).items():
        h.update(f"{n}:{fingerprint(t)}".encode())
    return h.hexdigest()[:16]


def pick_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` / ``cuda:N`` / ``cpu`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


def _placement(hf: Any) -> dict[str, str]:
    """Module -> device as accelerate dispatched it; ``{"": device}`` when one device holds
    everything (transformers then sets no ``hf_device_map``)."""
    placed = getattr(hf, "hf_device_map", None)
    if placed:
        return {k: str(v) for k, v in placed.items()}
    return {"": str(next(hf.parameters()).device)}


def _to_fp32_input(module: torch.nn.Module, args: tuple) -> tuple:
    if args and torch.is_tensor(args[0]) and args[0].dtype != torch.float32:
        return (args[0].float(), *args[1:])
    return args


def load_model(
    model: str,
    layers: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    train_routers: bool = True,
    echo: Callable[[str], None] | None = None,
) -> TunerModel:
    """Load ``model`` frozen, with float32 trainable routers on the ``layers`` to tune.

    ``train_routers=False`` loads the plain frozen model in ``dtype`` (any of
    :data:`~tuner.model.dtypes.DTYPES`; routers stay in it too, as a serving engine holds
    them): ``tuned`` is then empty. Evaluation and diagnostics load models this way.

    ``dtype`` ``auto`` resolves to bfloat16 on CUDA and float32 on CPU (see
    :func:`resolve_dtype`; the result is ``TunerModel.dtype``). ``device_map`` (``auto``,
    ``balanced``, ``sequential``) spreads the model over every visible device instead of
    moving it to ``device``. Before loading, the weights' size is checked against the
    device's free memory (:func:`tuner.model.memory.plan_dtype`; ``echo`` hears when ``auto``
    falls back to bfloat16 on CPU).

    Raises :class:`UnsupportedModelError` (no routers; names the architecture and the
    supported ones), :class:`LayersError` (``layers`` out of range) or
    :class:`DeviceMapError` (a tuned router was offloaded).
    """
    import transformers

    ckpt = resolve_checkpoint(model, trust_remote_code)
    config = load_config(ckpt)
    arch = architecture_of(config)
    check_routers_unquantized(config, checkpoint_shapes(ckpt), where=str(ckpt))
    # found from the model itself (roma_vllm.discovery), matched to checkpoint names
    routers = find_routers(arch, checkpoint_shapes(ckpt), num_experts(config), config=config)
    moe_layers = router_layers(routers)
    tuned_layers = parse_layers(layers, moe_layers)
    tuned_names = [n for n, layer in routers.items() if layer in tuned_layers]

    dev = pick_device("auto" if device_map else device)
    if train_routers:
        resolve_dtype(dtype, dev)  # refuses dtypes the tuner does not train in
    if not device_map:  # a device map spreads the model; accelerate checks what fits
        dtype = plan_dtype(dtype, dev, ckpt, echo)
    elif dtype == "auto":
        dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[dtype],
        "trust_remote_code": trust_remote_code,
        # weights go straight from the files to their device, in the run's dtype: no full
        # host copy first (under torchrun, each rank's own GPU)
        "device_map": device_map or {"": dev},
    }
    if dev.type == "cpu":
        kwargs["experts_implementation"] = "eager"  # batched_mm is ~70x slower on CPU
    cls = getattr(transformers, arch, None) if not trust_remote_code else None

    def from_pretrained() -> Any:
        if cls is not None and loads_quantized(config, str(ckpt), dev) != "transformers":
            # tensor by tensor with pread: no mapped copy of the checkpoint in RSS
            with frozen_state_dict(ckpt, config, DTYPES[dtype]) as state:
                hf_config = plain_config(cls.config_class.from_pretrained(str(ckpt)))
                return cls.from_pretrained(None, config=hf_config, state_dict=state, **kwargs)
        if cls is not None:
            return cls.from_pretrained(str(ckpt), **kwargs)
        return transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), **kwargs)

    try:
        hf = from_pretrained()
    except TypeError as e:
        # only a model class without the experts_implementation switch is retried (on the
        # same path, without it); any other TypeError is a bug and keeps its traceback
        if "experts_implementation" not in str(e) or "experts_implementation" not in kwargs:
            raise
        kwargs.pop("experts_implementation")
        hf = from_pretrained()
    hf.eval()
    if hf.get_output_embeddings() is None:  # the task loss scores tokens with the LM head
        raise UnsupportedModelError(
            f"{arch}: transformers' {type(hf).__name__} exposes no output embeddings "
            "(get_output_embeddings() is None), which tuning scores answers with"
        )
    hf.requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(ckpt), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    base = checkpoint_tensors(ckpt, tuned_names) if train_routers else {}
    names = {id(p): n for n, p in hf.named_parameters()}
    tuned: dict[str, torch.nn.Parameter] = {}
    modules: dict[int, torch.nn.Module] = {}
    for name in tuned_names:
        param = hf_parameter(hf, name)
        module_name = names[id(param)].rsplit(".", 1)[0]
        modules[routers[name]] = hf.get_submodule(module_name)
        if not train_routers:
            continue
        if param.device.type == "meta":
            raise DeviceMapError(
                f"--device-map {device_map}: {name} was offloaded (the model does not fit in "
                "the visible devices' memory), and an offloaded router cannot train; use more "
                "or larger GPUs, --dtype bfloat16, or fewer --layers"
            )
        with torch.no_grad():
            # exact master weights, on the device that holds this router's layer
            param.data = base[name].to(param.device, torch.float32).clone()
        param.requires_grad_(True)
        tuned[name] = param
    tm = TunerModel(
        model=hf,
        tokenizer=tokenizer,
        architecture=arch,
        checkpoint=ckpt,
        name=str(model),
        moe_layers=moe_layers,
        layers=tuned_layers,
        tuned=tuned,
        router_modules=dict(sorted(modules.items())),
        base=base,
        # the router's rows: routed experts, plus the "zero" experts some routers also score
        num_experts=int(checkpoint_shapes(ckpt)[tuned_names[0]][0]),
        fingerprint=checkpoint_fingerprint(ckpt, list(routers)),
        dtype=dtype,
        device_map=_placement(hf) if device_map else None,
    )
    if DTYPES[dtype] != torch.float32 and train_routers:
        for module in tm.router_modules.values():
            tm._hooks.append(module.register_forward_pre_hook(_to_fp32_input))
    return tm


def describe(tm: TunerModel) -> dict[str, Any]:
    """A JSON-able summary for logs and metadata."""
    return {
        "model": tm.name,
        "architecture": tm.architecture,
        "fingerprint": tm.fingerprint,
        "moe_layers": tm.moe_layers,
        "tuned_layers": tm.layers,
        "tuned_tensors": sorted(tm.tuned),
        "trainable_parameters": sum(p.numel() for p in tm.tuned.values()),
        "num_experts": tm.num_experts,
        "dtype": tm.dtype,
        "device": str(tm.device),
        "devices": sorted({str(p.device) for p in tm.tuned.values()} | {str(tm.device)}),
        "device_map": tm.device_map,
    }


__all__ = [
    "DeviceMapError",
    "LayersError",
    "TunerModel",
    "UnsupportedModelError",
    "describe",
    "load_model",
    "parse_layers",
    "resolve_dtype",
]
