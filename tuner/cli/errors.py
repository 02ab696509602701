"""Errors a user can fix, shown as one red line instead of a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from roma_vllm.architectures import UnsupportedModelError
from roma_vllm.deltas import DeltaError


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is meant for the user (each is one line)."""
    from tuner.data.prompts import EncodeError
    from tuner.data.sources import DataError
    from tuner.evaluate.backends.vllm import EngineStartError

    return (
        DeltaError,
        DataError,
        EncodeError,
        EngineStartError,
        UnsupportedModelError,
        FileNotFoundError,
        ValueError,
        KeyError,
    )


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Print a user-fixable error as ``Error: ...`` on stderr and exit with status 1."""
    try:
        yield
    except user_errors() as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        typer.secho(f"Error: {message}", fg="red", err=True)
        raise typer.Exit(1) from None
