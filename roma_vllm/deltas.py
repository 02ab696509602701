"""The router-delta file: the one artifact the tuner writes and the vLLM loader reads.

A delta file is a single safetensors file:

* tensors: Hugging Face checkpoint names of router weights (and router biases where the
  architecture has them), float32, same shapes as the base tensors, holding
  ``tuned - base``;
* ``__metadata__["roma"]``: JSON with the format version, the roma-vllm version, the
  architecture, the base model, a fingerprint of every base router tensor the deltas were
  made against, the tuned layers, and a free-form ``training`` record.

Deltas are added in float32 and cast back to the checkpoint dtype, so serving, merging and
in-memory application all produce the same weights.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from roma_vllm._version import __version__
from roma_vllm.architectures import router_spec
from roma_vllm.errors import RomaError

FORMAT_VERSION = 1
METADATA_KEY = "roma"
DELTAS_FILENAME = "roma_deltas.safetensors"


class DeltaError(RomaError, ValueError):
    """A delta file is unusable; the message names the file and what is wrong."""


def fingerprint(tensor: torch.Tensor) -> str:
    """Content hash of a base router tensor (shape + float32 values), dtype-independent."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class RouterDeltas:
    """Router-weight deltas plus the metadata that makes them self-describing."""

    tensors: dict[str, torch.Tensor]
    architecture: str
    base_model: str
    base_fingerprints: dict[str, str]
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    roma_vllm_version: str = __version__

    @property
    def layers(self) -> list[int]:
        spec = router_spec(self.architecture)
        return sorted({layer for n in self.tensors if (layer := spec.match(n)) is not None})

    def max_abs(self) -> float:
        return max((float(t.abs().max()) for t in self.tensors.values()), default=0.0)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "roma_vllm_version": self.roma_vllm_version,
            "architecture": self.architecture,
            "base_model": self.base_model,
            "base_fingerprints": self.base_fingerprints,
            "layers": self.layers,
            "training": self.training,
        }


def make_deltas(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    architecture: str,
    base_model: str,
    training: dict[str, Any] | None = None,
) -> RouterDeltas:
    """``tuned - base`` in float32 for every name in ``tuned``, fingerprinted against ``base``."""
    tensors = {n: tuned[n].detach().float().cpu() - base[n].detach().float().cpu() for n in tuned}
    return RouterDeltas(
        tensors=tensors,
        architecture=architecture,
        base_model=base_model,
        base_fingerprints={n: fingerprint(base[n]) for n in tuned},
        training=training or {},
    )


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's contents, or a folder's entries, from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync_path`` for a folder, so that a rename into it survives a power loss.

    File systems that cannot sync a folder say so with EINVAL (or ENOTSUP); only those
    errors are ignored, any other is raised.
    """
    try:
        fsync_path(path)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    The temp file is fsynced before the rename and the folder after it, so that after a
    power loss ``path`` holds either the old file or the whole new one (a killed process
    alone cannot leave a partial file even without them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        # without this the rename can reach the disk before the data: an empty file after a crash
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)  # makes the rename itself durable
    return path


def write_deltas(path: str | os.PathLike, deltas: RouterDeltas) -> Path:
    """Validate and write ``deltas`` to ``path`` atomically (temp file + rename)."""
    validate(deltas, str(path))
    tensors = {
        n: t.detach().to("cpu", torch.float32).contiguous() for n, t in deltas.tensors.items()
    }
    meta = {METADATA_KEY: json.dumps(deltas.metadata(), sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_deltas(path: str | os.PathLike) -> RouterDeltas:
    """Read and validate a delta file; :class:`DeltaError` names the file and the problem."""
    p = Path(path)
    if p.is_dir():
        p = p / DELTAS_FILENAME
    if not p.is_file():
        raise DeltaError(f"{p}: delta file not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DeltaError(f"{p}: not a readable safetensors file ({e})") from None
    if raw_meta is None:
        raise DeltaError(f"{p}: no '{METADATA_KEY}' metadata; not a roma-vllm delta file")
    try:
        meta = json.loads(raw_meta)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DeltaError(f"{p}: metadata '{METADATA_KEY}' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DeltaError(f"{p}: metadata '{METADATA_KEY}' is not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaError(
            f"{p}: unknown format_version {version!r} (this roma-vllm reads {FORMAT_VERSION}); "
            "upgrade roma-vllm or re-export the deltas"
        )
    for key in ("architecture", "base_model", "base_fingerprints"):
        if key not in meta:
            raise DeltaError(f"{p}: metadata field '{key}' is missing")
    _check_metadata_types(meta, str(p))
    deltas = RouterDeltas(
        tensors=tensors,
        architecture=meta["architecture"],
        base_model=meta["base_model"],
        base_fingerprints=dict(meta["base_fingerprints"]),
        training=meta.get("training", {}),
        format_version=version,
        roma_vllm_version=meta.get("roma_vllm_version", "unknown"),
    )
    validate(deltas, str(p))
    return deltas


def _check_metadata_types(meta: dict[str, Any], where: str) -> None:
    for key in ("architecture", "base_model"):
        if not isinstance(meta[key], str):
            raise DeltaError(f"{where}: metadata field '{key}' is not a string")
    fps = meta["base_fingerprints"]
    if not isinstance(fps, dict) or not all(isinstance(v, str) for v in fps.values()):
        raise DeltaError(
            f"{where}: metadata field 'base_fingerprints' is not an object of tensor name -> hash"
        )
    if not isinstance(meta.get("training", {}), dict):
        raise DeltaError(f"{where}: metadata field 'training' is not an object")


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def validate(deltas: RouterDeltas, where: str) -> None:
    """Names are routers of the declared architecture, values are finite float32."""
    if not deltas.tensors:
        raise DeltaError(f"{where}: holds no tensors")
    spec = router_spec(deltas.architecture)
    for name, t in deltas.tensors.items():
        if spec.match(name) is None:
            raise DeltaError(
                f"{where}: tensor '{name}' is not a router of {deltas.architecture} "
                f"(expected names matching {spec.pattern})"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise DeltaError(f"{where}: tensor '{name}' has dtype {t.dtype}, expected float32")
        if not torch.isfinite(t).all():
            raise DeltaError(f"{where}: tensor '{name}' holds NaN or Inf values")
        if name not in deltas.base_fingerprints:
            raise DeltaError(f"{where}: tensor '{name}' has no base fingerprint in the metadata")


def check_base_tensor(
    deltas: RouterDeltas, name: str, base: torch.Tensor, where: str, allow_mismatch: bool = False
) -> None:
    """Refuse a delta made for another model: shape, then fingerprint (unless allowed)."""
    delta = deltas.tensors[name]
    if tuple(delta.shape) != tuple(base.shape):
        raise DeltaError(
            f"{where}: tensor '{name}' has shape {tuple(delta.shape)} but the model's is "
            f"{tuple(base.shape)}"
        )
    if not allow_mismatch and fingerprint(base) != deltas.base_fingerprints[name]:
        raise DeltaError(
            f"{where}: tensor '{name}' was made for different base weights (fingerprint "
            f"mismatch; deltas made from {deltas.base_model!r}); set roma_allow_mismatch=true "
            "to apply anyway"
        )


def add_delta(base: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``base + scale * delta`` computed in float32, returned in ``base``'s dtype."""
    out = base.float() + scale * delta.to(base.device, torch.float32)
    return out.to(base.dtype)


def parse_scale(value: Any, where: str) -> float:
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise DeltaError(f"{where}: roma_scale must be a number, got {value!r}") from None
    if not math.isfinite(scale):
        raise DeltaError(f"{where}: roma_scale must be finite, got {value!r}")
    return scale
