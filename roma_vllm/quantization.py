"""Quantized checkpoints: which format, and is a router quantized in it?

FP8 (vLLM's ``fp8``, per-tensor or ``weight_block_size``), compressed-tensors, MXFP4, AWQ and
GPTQ checkpoints keep their routers unquantized on purpose (they are listed in the format's
ignore list), and vLLM then builds the router (``GateLinear``) unquantized: a router delta
merges into a plain float tensor. A router that is itself quantized cannot take a delta, and
one left off the ignore list is one that vLLM would build as a quantized layer. Both are
refused here, by the plugin and by ``roma-tune run``, in one line naming the tensor and the
format (:func:`check_routers_unquantized`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

from roma_vllm.errors import RomaError

__all__ = [
    "QuantizedRouterError",
    "check_routers_unquantized",
    "format_name",
    "quantization_config",
    "router_modules",
]

# Tensors a router may carry beside its weight without being quantized.
_PLAIN = ("weight", "bias", "e_score_correction_bias")
# Router modules by name, for checkpoints whose quantized router has no ``.weight`` left for
# the router discovery to find: a gate/router of a decoder layer's MoE block, never an expert.
_ROUTER_MODULE = re.compile(
    r"(?:^|\.)layers\.\d+\.(?:mlp|block_sparse_moe|feed_forward|moe|mixer)"
    r"\.(?:gate|router|router\.layer|router\.gate|router\.classifier)$"
)


class QuantizedRouterError(RomaError, ValueError):
    """A router of a quantized checkpoint is (or would be served) quantized."""


def quantization_config(config: Any) -> dict[str, Any] | None:
    """The ``quantization_config`` of a config (dict or transformers config), or None."""
    if isinstance(config, Mapping):
        q = config.get("quantization_config")
        if q is None and isinstance(config.get("text_config"), Mapping):
            q = config["text_config"].get("quantization_config")
    else:
        q = getattr(config, "quantization_config", None)
    if q is not None and not isinstance(q, Mapping):
        q = q.to_dict() if hasattr(q, "to_dict") else vars(q)
    return dict(q) if q else None


def format_name(qconfig: Mapping[str, Any]) -> str:
    """A readable name: ``fp8``, ``fp8 (block 128x128)``, ``compressed-tensors``, ``awq``..."""
    method = str(qconfig.get("quant_method", "unknown"))
    block = qconfig.get("weight_block_size")
    if method == "fp8" and block:
        return f"fp8 (block {'x'.join(str(b) for b in block)})"
    if method == "fp8":
        return "fp8 (per-tensor)"
    return method


def router_modules(names: Iterable[str], routers: Iterable[str] = ()) -> set[str]:
    """Router module names: those of ``routers`` (checkpoint tensor names) and every module
    among ``names`` that looks like a MoE layer's gate or router."""
    modules = {r.rsplit(".", 1)[0] for r in routers}
    for name in names:
        module = name.rsplit(".", 1)[0]
        if _ROUTER_MODULE.search(module) and ".experts." not in module:
            modules.add(module)
    return modules


def check_routers_unquantized(
    config: Any, names: Iterable[str], routers: Iterable[str] = (), where: str = ""
) -> None:
    """Refuse a quantized checkpoint whose routers are not plain float tensors.

    ``names`` are the checkpoint's tensor names; ``routers`` the router tensors found so far
    (may be empty: the check also recognises routers by name). A router is refused when a
    quantization tensor sits beside it (``weight_scale``, ``qweight``, ``qzeros``,
    ``weight_packed``, ``*_blocks``...) or when the format's ignore list leaves it out, so
    that vLLM would build it as a quantized layer. No-op for unquantized checkpoints.
    """
    qconfig = quantization_config(config)
    if qconfig is None:
        return
    names = list(names)
    fmt = format_name(qconfig)
    prefix = f"{where}: " if where else ""
    by_module: dict[str, list[str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, []).append(leaf)
        if leaf.endswith(("_blocks", "_scales")):  # MXFP4 names the weight itself
            by_module.setdefault(name.rsplit("_", 1)[0], []).append(leaf)
    for module in sorted(router_modules(names, routers)):
        extra = sorted(leaf for leaf in by_module.get(module, []) if leaf not in _PLAIN)
        extra += sorted(
            leaf for leaf in by_module.get(f"{module}.weight", []) if leaf.endswith("_blocks")
        )
        if extra:
            raise QuantizedRouterError(
                f"{prefix}router tensor '{module}.{extra[0]}' shows the router '{module}' is "
                f"quantized in this {fmt} checkpoint; roma-vllm tunes and serves unquantized "
                "routers only (quantize without the routers: list them in the format's ignore "
                "list)"
            )
        key = _not_ignored(qconfig, module)
        if key is not None:
            raise QuantizedRouterError(
                f"{prefix}router tensor '{module}.weight' is not excluded by "
                f"quantization_config.{key} of this {fmt} checkpoint, so vLLM would build the "
                f"router as a quantized layer; exclude '{module}' (or a pattern matching it) "
                f"there"
            )


def _not_ignored(qconfig: Mapping[str, Any], module: str) -> str | None:
    """The config key that should exclude ``module`` from quantization but does not, or None.

    Only where that list decides whether vLLM quantizes a linear layer: compressed-tensors'
    ``ignore``, AWQ's ``modules_to_not_convert``, GPTQ's ``dynamic`` ``-:`` rules (or
    ``modules_in_block_to_quantize``), and FP8's ``ignored_layers`` /
    ``modules_to_not_convert`` when the checkpoint has one (DeepSeek-V3's has none, and its
    model code builds the router unquantized). MXFP4 quantizes only the experts.
    """
    method = qconfig.get("quant_method")
    if method == "compressed-tensors":
        return None if _matches(qconfig.get("ignore") or [], module) else "ignore"
    if method == "awq":
        skip = qconfig.get("modules_to_not_convert") or []
        return (
            None if any(s in module for s in skip) else "modules_to_not_convert"
        )  # vLLM: substring
    if method == "gptq":
        rules = [r[2:] for r in (qconfig.get("dynamic") or {}) if r.startswith("-:")]
        if any(re.match(r, module) for r in rules):
            return None
        block = qconfig.get("modules_in_block_to_quantize")
        if block:
            flat = [m for group in block for m in (group if isinstance(group, list) else [group])]
            return "modules_in_block_to_quantize" if any(m in module for m in flat) else None
        return "dynamic"
    if method == "fp8":
        for key in ("ignored_layers", "modules_to_not_convert"):
            if qconfig.get(key):
                return None if _matches(qconfig[key], module) else key
    return None


def _matches(patterns: Iterable[str], module: str) -> bool:
    """``module`` named by an ignore entry: exact, ``re:`` regex, glob, or a dotted suffix."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif "*" in p:
            if fnmatch.fnmatchcase(module, p):
                return True
        elif module == p or module.endswith(f".{p}"):
            return True
    return False
