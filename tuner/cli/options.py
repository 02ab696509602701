"""Options shared by several commands, defined once so their flags and help agree."""

from __future__ import annotations

import typer

MODEL = typer.Option(..., "--model", help="Base checkpoint: a local folder or a Hub name.")
DATA = typer.Option(
    ...,
    "--data",
    help="Data: .jsonl/.json/.csv, hf:NAME[:CONFIG]:SPLIT, a datasets folder or "
    "lm-eval:TASK[:SPLIT][=LOCAL_COPY]; several, comma-separated, make a mixture "
    "(SOURCE@N caps one, SOURCE{question=COL,...} maps columns; see `roma-tune data --help`).",
)
SCALE = typer.Option(1.0, "--scale", help="Multiply the deltas by this factor.")
ALLOW_MISMATCH = typer.Option(
    False, "--allow-mismatch", help="Apply deltas made for other base weights anyway."
)
SCORING = typer.Option(
    None,
    "--scoring",
    help="'letter' or 'loglik'. Default: the scoring the deltas were trained with, else letter.",
)
TEMPLATE = typer.Option(
    None, "--template", help="Prompt template (text or file). Default: the training one."
)
CHAT_TEMPLATE = typer.Option(
    None, "--chat-template/--no-chat-template", help="Wrap prompts in the model's chat template."
)
LIMIT = typer.Option(None, "--limit", help="Use only the first N rows.")
SKIP_BAD_ROWS = typer.Option(False, "--skip-bad-rows", help="Skip and count bad rows.")
DEVICE = typer.Option(
    "auto", "--device", help="hf forward: 'auto' (cuda when available), 'cpu' or 'cuda'."
)
TRUST_REMOTE_CODE = typer.Option(
    False,
    "--trust-remote-code",
    help="Run the checkpoint's own Python code (only for checkpoints you trust).",
)
DEVICE_MAP = typer.Option(
    None,
    "--device-map",
    help="hf forward: spread the model over devices ('auto', 'balanced', 'sequential').",
)
EMBEDDER = typer.Option(
    "all-MiniLM-L6-v2", "--embedder", help="sentence-transformers model for task embeddings."
)
