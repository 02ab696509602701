"""Routing vectors: what RoMA aligns.

The routing vector of a sample is the softmax over all experts of the router logits at its
last prompt token, concatenated over the tuned layers (ascending); ``log-probs`` takes its
logarithm instead (``--routing-vector``). It is computed from the
router modules' own inputs in the same forward pass that computes the task loss, so when
the routers require grad the vector carries gradient to every tuned router (the authors'
code read it from a file and the regulariser did nothing).

Router modules differ in what they return (plain logits, ``(logits, scores, indices)``,
Llama 4's ``(scores, logits)``, sigmoid scores, grouped top-k), so the capture does not read
their output: it takes the router's input ``x`` (flattened ``(rows * seq)`` tokens, so the
last prompt token of row ``r`` is flat index ``r * seq + pos``) and computes the logits
``x @ W.T (+ b)`` from the router's own weight, at the chosen tokens only. That is what
every router computes first, and gradient reaches ``W`` the same way. The softmax is used
for every architecture, also where selection uses sigmoid scores: it is a fixed, smooth map
of the logits.
"""

from __future__ import annotations

from typing import Any

import torch

from tuner.model.load import TunerModel


class OverriddenOutput(tuple):
    """A router's ``(logits, weights, indices)`` output in which some tokens' routing was
    replaced after the router ran (:class:`tuner.diagnose.override.RouterOverride`). The
    capture records these logits, not the ones it computes from the router's input: the
    routing the rest of the model used is the replaced one."""


class RoutingCapture:
    """Context manager: hooks on the tuned routers that keep the logits at chosen tokens.

    Set :attr:`positions` (flat token indices) before each forward pass, then read
    :meth:`vectors`.
    """

    def __init__(self, tm: TunerModel, vector: str = "probs") -> None:
        if vector not in ("probs", "log-probs"):
            raise ValueError(f"routing vector: 'probs' or 'log-probs', got {vector!r}")
        self.tm = tm
        self.vector = vector
        self.positions: torch.Tensor | None = None
        self.logits: dict[int, torch.Tensor] = {}
        self._parent_x: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> RoutingCapture:
        names = {id(m): n for n, m in self.tm.model.named_modules()}
        for layer, module in self.tm.router_modules.items():
            parent = self.tm.model.get_submodule(names[id(module)].rsplit(".", 1)[0])
            # prepend: see the router's input before any other hook. The weight's parent
            # module too: LongCat-Flash's router calls F.linear on its classifier's weight,
            # so the classifier module itself never runs (its input is the parent's)
            for target, into in ((module, self.logits), (parent, None)):
                hook = self._hook(layer, module, into)
                self._handles.append(
                    target.register_forward_pre_hook(hook, prepend=True, with_kwargs=True)
                )
            # after the router ran (and after any override registered later with prepend)
            self._handles.append(module.register_forward_hook(self._overridden(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(
        self, layer: int, router: torch.nn.Module, into: dict[int, torch.Tensor] | None
    ) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.positions is None:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            if into is None:  # the parent: used only where the router module did not run
                self._parent_x[layer] = x
                return
            weight = module.weight
            bias = getattr(module, "bias", None)
            bias = bias if torch.is_tensor(bias) and bias.shape == weight.shape[:1] else None
            x = x.reshape(-1, weight.shape[-1]).index_select(0, self.positions.to(x.device))
            # the float32 pre-hook of tuned routers runs after this one: cast here too
            self.logits[layer] = torch.nn.functional.linear(x.to(weight.dtype), weight, bias)

        return hook

    def _overridden(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if self.positions is None or not isinstance(output, OverriddenOutput):
                return
            logits = output[0].reshape(-1, output[0].shape[-1])
            self.logits[layer] = logits.index_select(0, self.positions.to(logits.device))

        return hook

    def vectors(self, device: torch.device | None = None) -> torch.Tensor:
        """``[samples, layers * experts]`` routing vectors of the last forward pass, on
        ``device`` (default: the first tuned router's; routers on several devices under a
        device map are gathered there)."""
        for layer, x in self._parent_x.items():
            if layer not in self.logits:
                self._hook(layer, self.tm.router_modules[layer], self.logits)(
                    self.tm.router_modules[layer], (x,), {}
                )
        self._parent_x = {}
        missing = [layer for layer in self.tm.router_modules if layer not in self.logits]
        if missing:
            raise RuntimeError(f"routers of layers {missing} did not run in the forward pass")
        norm = torch.softmax if self.vector == "probs" else torch.log_softmax
        parts = [norm(self.logits[layer].float(), dim=-1) for layer in self.tm.router_modules]
        device = device if device is not None else parts[0].device
        parts = [p.to(device) for p in parts]
        self.logits = {}
        self.positions = None  # disarm: a nested capture's forward must not write here
        return torch.cat(parts, dim=-1)
