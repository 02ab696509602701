"""`roma-tune`: train MoE routers with RoMA and evaluate the result."""

from __future__ import annotations

import typer

from roma_vllm import __version__
from tuner.run_cmd import run_command

app = typer.Typer(
    help="Train MoE routers with routing manifold alignment (RoMA).", no_args_is_help=True
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"roma-tune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Train MoE routers with RoMA and evaluate them through vLLM."""


# heavy imports happen inside the command, so `roma-tune --help` stays fast
app.command("run")(run_command)
