"""The ``roma`` load format: vLLM's default loader plus router deltas merged as weights stream in.

``vllm serve MODEL --load-format roma --model-loader-extra-config '{"roma_deltas": PATH}'``
loads MODEL's checkpoint exactly as ``--load-format auto`` would, except that every router
tensor named in the delta file gets ``scale * delta`` added (float32 math) on its way into
the model. That happens before ``process_weights_after_loading`` (which on CPU repacks the
router for oneDNN), so vLLM's fused-MoE kernels run the tuned routing at no extra cost.

Every check that can fail runs before the model is built (file, metadata, architecture,
names, shapes, base fingerprints, read from the checkpoint's safetensors headers and router
tensors only); the stream re-checks what it patches and, at its end, refuses deltas that
matched nothing. Errors are :class:`~roma_vllm.settings.RomaLoadError`, one line naming the
file and the problem; vLLM logs them from the engine-core process and fails start-up. The
loader never serves base routing when deltas were asked for; while ``ROMA_DELTAS`` or ``roma_*``
extra-config keys are set, every other load format refuses to start (see ``_guard_other_loaders``).

Parallelism: routers are replicated (``ReplicatedLinear``), so one full-size delta serves any
tensor-parallel size. With pipeline parallelism every rank streams the whole checkpoint and
the model drops tensors of layers it does not hold, so each rank merges what it receives and
the ranks together cover every delta.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Generator, Iterable
from typing import Any

import vllm

from roma_vllm.settings import RomaLoadError, check_vllm_version

# Fail with a version message rather than an ImportError from vLLM internals that moved.
check_vllm_version(vllm.__version__)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402
from vllm.config import ModelConfig, VllmConfig  # noqa: E402
from vllm.config.load import LoadConfig  # noqa: E402
from vllm.logger import init_logger  # noqa: E402
from vllm.model_executor.model_loader import (  # noqa: E402
    DefaultModelLoader,
    register_model_loader,
)

from roma_vllm.architectures import (  # noqa: E402
    UnsupportedModelError,
    find_routers,
    num_experts,
    router_spec,
)
from roma_vllm.deltas import (  # noqa: E402
    DeltaError,
    RouterDeltas,
    check_base_tensor,
    fingerprint,
    read_deltas,
)
from roma_vllm.quantization import (  # noqa: E402
    QuantizedRouterError,
    check_routers_unquantized,
)
from roma_vllm.settings import (  # noqa: E402
    LOAD_FORMAT,
    RomaSettings,
    refuse_deltas_for_other_format,
    split_extra_config,
)

# Under the "vllm" logger namespace, so that vLLM's handlers print it in every process.
logger = init_logger(f"vllm.{__name__}")

__all__ = ["RomaLoadError", "RomaModelLoader", "register_loader"]


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(error: Exception) -> RomaLoadError:
    return RomaLoadError(_one_line(str(error)))


class RomaModelLoader(DefaultModelLoader):
    """``DefaultModelLoader`` that adds router deltas to the weight stream."""

    def __init__(self, load_config: LoadConfig):
        t0 = time.perf_counter()
        # Our keys are not the parent's business: it rejects unknown keys and unknown formats.
        try:
            settings, rest = split_extra_config(load_config.model_loader_extra_config)
        except DeltaError as e:
            raise _fail(e) from None
        super().__init__(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config=rest)
        )
        self.settings: RomaSettings = settings
        try:
            self.deltas: RouterDeltas = read_deltas(settings.deltas)
        except DeltaError as e:
            raise _fail(e) from None
        self.where = str(settings.deltas)
        self._checked_model: str | None = None
        self._pending: set[str] = set()
        self._stream_done = False
        self._warned: set[str] = set()  # tensors warned about under roma_allow_mismatch
        # Time spent in the loader's own work (reading and checking deltas, merging): the
        # whole cost of the plugin, reported in the INFO line and by the benchmark.
        self.overhead_seconds = time.perf_counter() - t0

    # -- checks before the model is built ------------------------------------------------

    def check_model(self, model_config: ModelConfig) -> None:
        """Architecture, router names, shapes and base fingerprints against the checkpoint."""
        t0 = time.perf_counter()
        try:
            self._check_model(model_config)
        finally:
            self.overhead_seconds += time.perf_counter() - t0

    def _check_model(self, model_config: ModelConfig) -> None:
        hf_config = model_config.hf_config
        served = list(getattr(hf_config, "architectures", None) or [])
        if self.deltas.architecture not in served:
            raise RomaLoadError(
                f"{self.where}: deltas are for {self.deltas.architecture} but the served model "
                f"{model_config.model} is {', '.join(served) or 'of unknown architecture'}"
            )
        # (hf_folder, files, use_safetensors[, index_file]): vLLM 0.31 added index_file
        prepared = self._prepare_weights(
            model_config.model, None, model_config.revision, True, None
        )
        files, use_safetensors = prepared[1], prepared[2]
        if not use_safetensors:  # .bin/.pt checkpoints: the stream checks everything
            self._checked_model = model_config.model
            return
        shapes, where = {}, {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                for name in h.keys():  # noqa: SIM118
                    shapes[name] = tuple(h.get_slice(name).get_shape())
                    where[name] = f
        try:
            # a quantized checkpoint's routers must be plain float tensors (roma_vllm.quantization)
            check_routers_unquantized(hf_config, shapes, self.deltas.tensors, model_config.model)
            # the served config's own routers (meta-device build of its transformers class)
            routers = find_routers(
                self.deltas.architecture, shapes, num_experts(hf_config), config=hf_config
            )
        except (UnsupportedModelError, QuantizedRouterError) as e:
            raise RomaLoadError(f"{self.where}: {_one_line(str(e))}") from None
        for name in self.deltas.tensors:
            if name not in shapes:
                raise RomaLoadError(
                    f"{self.where}: tensor '{name}' does not exist in the checkpoint of "
                    f"{model_config.model}"
                )
            if name not in routers:
                raise RomaLoadError(
                    f"{self.where}: tensor '{name}' is not a router of {model_config.model}"
                )
        for name in self.deltas.tensors:
            with safe_open(where[name], framework="pt") as h:
                base = h.get_tensor(name)
            self._check_tensor(name, base)
        self._checked_model = model_config.model

    def _check_tensor(self, name: str, base: torch.Tensor) -> None:
        try:
            check_base_tensor(self.deltas, name, base, self.where, self.settings.allow_mismatch)
        except DeltaError as e:
            raise _fail(e) from None
        if (
            self.settings.allow_mismatch
            and name not in self._warned
            and fingerprint(base) != self.deltas.base_fingerprints[name]
        ):
            self._warned.add(name)
            logger.warning(
                "roma-vllm: %s: tensor '%s' was made for different base weights (deltas made "
                "from %r); applying anyway because roma_allow_mismatch is set",
                self.where,
                name,
                self.deltas.base_model,
            )

    # -- vLLM hooks ------------------------------------------------------------------------

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        self.check_model(model_config)  # before building the model: fail fast
        return super().load_model(vllm_config, model_config, prefix)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        if self._checked_model != model_config.model:  # called alone (in-place reload)
            self.check_model(model_config)
        self._pending = set(self.deltas.tensors)
        self._stream_done = False
        super().load_weights(model, model_config)
        if not self._stream_done:  # the model stopped reading early: still refuse leftovers
            self._check_all_matched(model_config)

    def get_all_weights(
        self, model_config: ModelConfig, model: nn.Module
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        yield from self.merge_deltas(super().get_all_weights(model_config, model), model_config)

    def merge_deltas(
        self, weights: Iterable[tuple[str, torch.Tensor]], model_config: ModelConfig | None = None
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Add ``scale * delta`` to each router tensor of ``weights`` as it passes.

        Float32 math; the result keeps the checkpoint dtype, or the served dtype when that is
        more precise (so float32 serving of a bf16 checkpoint does not round the tuned router
        back to bf16). Raises at the end if a delta matched nothing.
        """
        served = getattr(model_config, "dtype", None)
        self._pending = set(self.deltas.tensors)
        self._stream_done = False
        for name, tensor in weights:
            delta = self.deltas.tensors.get(name)
            if delta is None:
                yield name, tensor
                continue
            t0 = time.perf_counter()
            self._check_tensor(name, tensor)
            merged = tensor.float() + self.settings.scale * delta.to(tensor.device, torch.float32)
            out_dtype = served if _more_precise(served, tensor.dtype) else tensor.dtype
            merged = merged.to(out_dtype)
            self._pending.discard(name)
            self.overhead_seconds += time.perf_counter() - t0
            yield name, merged
        self._stream_done = True
        self._check_all_matched(model_config)

    def _check_all_matched(self, model_config: ModelConfig | None) -> None:
        elsewhere = _not_on_this_rank(self.deltas, model_config)  # other pipeline stages'
        missing = sorted(self._pending - elsewhere)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RomaLoadError(
                f"{self.where}: tensor '{missing[0]}'{more} matched no tensor in the checkpoint "
                "stream; refusing to serve base routing"
            )
        applied = [n for n in self.deltas.tensors if n not in self._pending | elsewhere]
        spec = router_spec(self.deltas.architecture)
        layers = sorted({spec.match(n) for n in applied} - {None})
        logger.info(
            "roma-vllm: merged router deltas %s: %d tensors, %d layers, max |delta| %.4g, "
            "scale %g%s (%.0f ms)",
            self.where,
            len(applied),
            len(layers),
            max((float(self.deltas.tensors[n].abs().max()) for n in applied), default=0.0),
            self.settings.scale,
            " (base fingerprints NOT checked: roma_allow_mismatch)"
            if self.settings.allow_mismatch
            else "",
            1000 * self.overhead_seconds,
        )


def _more_precise(served: Any, stored: torch.dtype) -> bool:
    return (
        isinstance(served, torch.dtype)
        and served.is_floating_point
        and stored.is_floating_point
        and torch.finfo(served).bits > torch.finfo(stored).bits
    )


def _not_on_this_rank(deltas: RouterDeltas, model_config: ModelConfig | None) -> set[str]:
    """Delta names of layers another pipeline stage holds (their shard may not be streamed)."""
    if model_config is None:
        return set()
    try:
        from vllm.distributed.parallel_state import get_pp_group, model_parallel_is_initialized
        from vllm.distributed.utils import get_pp_indices

        if not model_parallel_is_initialized() or get_pp_group().world_size == 1:
            return set()
        pp = get_pp_group()
        n_layers = model_config.hf_text_config.num_hidden_layers
        start, end = get_pp_indices(n_layers, pp.rank_in_group, pp.world_size)
    except Exception:  # no distributed state (e.g. unit tests): every layer is ours
        return set()
    spec = router_spec(deltas.architecture)
    return {
        n
        for n in deltas.tensors
        if (layer := spec.match(n)) is not None and not start <= layer < end
    }


_registered = False


def register_loader() -> None:
    """Register :class:`RomaModelLoader` as ``--load-format roma`` (re-entrant, cheap)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not RomaModelLoader:
        register_model_loader(LOAD_FORMAT)(RomaModelLoader)
    _guard_other_loaders()
    _registered = True


def _guard_other_loaders() -> None:
    """Make every other loader refuse to start while deltas are asked for.

    Every vLLM loader passes through ``BaseModelLoader.__init__``, whichever module looked
    it up and however it was imported, so the check sits there (once; re-entrant).
    """
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.__init__
    if getattr(original, "_roma_guard", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, load_config: LoadConfig) -> None:
        if not isinstance(self, RomaModelLoader):
            try:
                refuse_deltas_for_other_format(
                    str(load_config.load_format), load_config.model_loader_extra_config
                )
            except RomaLoadError as e:
                raise _fail(e) from None
        original(self, load_config)

    __init__._roma_guard = True  # type: ignore[attr-defined]
    BaseModelLoader.__init__ = __init__  # type: ignore[method-assign]
