"""Whether PEFT applies a written LoRA adapter, checked with PEFT's own loading code.

The adapter's tensors carry the routers' *checkpoint* names (vLLM's module paths). PEFT
renames adapter keys on load only where transformers registers a weight conversion for the
model type (Mixtral's ``block_sparse_moe.gate`` -> ``mlp.gate``). Where the in-memory router
sits elsewhere and no conversion maps it there (GraniteMoe's ``router.layer.weight`` lives at
``router.weight``), PEFT loads nothing into that router, only warns "missing adapter keys",
and serves the base routing. An adapter that PEFT would ignore is never written.

PEFT's LoRA on a parameter acts only inside the forward of the module holding the
parameter. LongCat-Flash's router applies its classifier's weight with ``F.linear`` and never
calls the classifier module, so PEFT's adapter, though loaded, changes nothing there; an
adapter for a router module that its parent's ``forward`` does not call is refused too.

The key check runs PEFT's loading path (``load_peft_weights`` + ``set_peft_model_state_dict``,
the calls ``PeftModel.load_adapter`` makes, transformers-v5 key conversion included) on a
meta-device model built from the checkpoint's config: no weights are read or allocated.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from typing import Any

from roma_vllm.errors import RomaError

PEFT_PREFIX = "base_model.model."


class PeftWouldIgnoreError(RomaError, ValueError):
    """PEFT would load the adapter without applying it to some router (base routing)."""


def _router_of(missing_key: str, adapter_name: str) -> str:
    """``base_model.model.M.lora_A.<adapter>.weight`` -> the module path ``M``."""
    module = missing_key.removeprefix(PEFT_PREFIX)
    for part in ("lora_A", "lora_B"):
        module = module.replace(f".{part}.{adapter_name}.weight", "")
    return module


def uncalled_routers(base: Any, modules: list[str]) -> list[str]:
    """Those of ``modules`` whose parent module's ``forward`` never calls them (it reads
    their weight instead), read from the parent class's source."""
    out = []
    for module in modules:
        parent, child = module.rsplit(".", 1)
        source = inspect.getsource(type(base.get_submodule(parent)).forward)
        if not re.search(rf"self\.{re.escape(child)}\(", source):
            out.append(module)
    return out


def unapplied_routers(base: Any, adapter_dir: str | Path) -> list[str]:
    """In-memory router modules of ``base`` (a meta-device model, wrapped in place) that
    PEFT leaves without the adapter's weights when it loads ``adapter_dir`` (empty: every
    router gets them)."""
    from peft import LoraConfig, PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    peft_config = LoraConfig.from_pretrained(str(adapter_dir))
    with warnings.catch_warnings():
        # PEFT warns that LoRA on a parameter is experimental; the loading result says more
        warnings.simplefilter("ignore")
        model = PeftModel(base, peft_config, low_cpu_mem_usage=True)
        # as PeftModel.from_pretrained -> load_adapter: the model's legacy key mapping, then
        # PEFT's state-dict loading (which applies transformers' v5 weight conversions)
        key_mapping = getattr(base, "_checkpoint_conversion_mapping", None) or None
        weights = load_peft_weights(str(adapter_dir), device="cpu", key_mapping=key_mapping)
        result = set_peft_model_state_dict(model, weights, adapter_name="default")
    missing = [k for k in result.missing_keys if ".lora_" in k and ".default." in k]
    return sorted({_router_of(k, "default") for k in missing})


def check_peft_applies(
    checkpoint: str | Path, adapter_dir: str | Path, targets: dict[str, str], architecture: str
) -> None:
    """Refuse (:class:`PeftWouldIgnoreError`) an adapter PEFT would load but not apply.

    ``targets`` maps each router's checkpoint tensor name to its in-memory parameter name.
    """
    import transformers

    from roma_vllm.discovery import meta_model

    base = meta_model(transformers.AutoConfig.from_pretrained(str(checkpoint)))
    by_module = {memory.rsplit(".", 1)[0]: name for name, memory in targets.items()}
    uncalled = uncalled_routers(base, sorted(by_module))
    unapplied = unapplied_routers(base, adapter_dir)
    for found, why in (
        (
            unapplied,
            "PEFT's key renaming does not map the adapter's checkpoint name onto the "
            "in-memory router, so it loads nothing there",
        ),
        (
            uncalled,
            "its parent's forward reads the router's weight without calling the module, "
            "and PEFT's LoRA on a parameter acts only inside that module's forward",
        ),
    ):
        if found:
            module = found[0]
            raise PeftWouldIgnoreError(
                f"{architecture}: router '{by_module.get(module, module)}' (in memory "
                f"'{module}', {len(found)} routers in all): PEFT would not apply it: {why}, "
                "and would serve the base routing; no LoRA adapter is written for this "
                "architecture (serve the deltas with --load-format roma)"
            )
