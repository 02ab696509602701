"""What an evaluation or a diagnostic scores: the checkpoint, the checked deltas, and the
prompt settings (taken from the deltas' training config when not given)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuner.config import read_template
from tuner.evaluate.options import DEFAULT_SCORING

if TYPE_CHECKING:
    from roma_vllm.deltas import RouterDeltas


def training_config(deltas: Any) -> dict[str, Any]:
    """The run config recorded in a delta file (empty when there is none)."""
    training = getattr(deltas, "training", None) or {}
    config = training.get("config") if isinstance(training, dict) else None
    return config if isinstance(config, dict) else {}


@dataclass(frozen=True)
class Inputs:
    """The checkpoint, the checked deltas and the prompt settings a run scores with."""

    checkpoint: Path
    deltas: RouterDeltas | None
    scoring: str
    template: str | None
    chat: bool


class InputOptions(Protocol):
    """The options of a command that scores a model with optional deltas (eval, report)."""

    model: str
    deltas: str | None
    allow_mismatch: bool
    scoring: str | None
    template: str | None
    chat_template: bool | None


def resolve_inputs(opts: InputOptions) -> Inputs:
    """Resolve the checkpoint, read and check the deltas against it, and fill the prompt
    settings left unset from the deltas' training config (so prompts render as in training).

    ``template`` is a file holding the template or the template text itself (as in run).
    """
    from roma_vllm.checkpoint import resolve_checkpoint
    from roma_vllm.deltas import read_deltas
    from tuner.export.merge import check_against_checkpoint

    checkpoint = resolve_checkpoint(opts.model, getattr(opts, "trust_remote_code", False))
    deltas = None
    recorded: dict[str, Any] = {}
    if opts.deltas is not None:
        deltas = read_deltas(opts.deltas)
        check_against_checkpoint(checkpoint, deltas, str(opts.deltas), opts.allow_mismatch)
        recorded = training_config(deltas)
    template = opts.template if opts.template is not None else recorded.get("template")
    chat = opts.chat_template
    return Inputs(
        checkpoint=checkpoint,
        deltas=deltas,
        scoring=opts.scoring or recorded.get("scoring") or DEFAULT_SCORING,
        template=read_template(template),
        chat=chat if chat is not None else bool(recorded.get("chat_template")),
    )
