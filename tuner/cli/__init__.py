"""The `roma-tune` command line: the typer app, one module per command, one error handler.

Imports its commands lazily so `roma-tune --help` stays fast.
"""

from tuner.cli.app import app

__all__ = ["app"]
