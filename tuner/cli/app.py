"""`roma-tune`: train MoE routers with RoMA and evaluate the result.

Each command lives in its own module and imports its work lazily, so `roma-tune --help`
stays fast.
"""

from __future__ import annotations

import typer

from roma_vllm import __version__
from tuner.cli import diagnose, export
from tuner.cli.data import data_command
from tuner.cli.eval import eval_command
from tuner.cli.merge import merge_command
from tuner.cli.run import run_command

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


app.command("run")(run_command)
app.command("eval")(eval_command)
app.command("merge")(merge_command)
app.command("export")(export.export_command)
app.command("data")(data_command)
app.add_typer(diagnose.app, name="diagnose")
# `roma-tune report` predates `roma-tune diagnose report` and keeps working
app.command("report", help="Same as `roma-tune diagnose report`.")(diagnose.report_command)
