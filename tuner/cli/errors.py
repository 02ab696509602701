"""The one error handler of every `roma-tune` command.

An error the user can fix (:class:`roma_vllm.errors.RomaError`, whose message is one line)
prints as one red ``Error: ...`` line, exit status 1. Anything else is a bug in roma-vllm:
it keeps its full traceback, followed by one line asking for a bug report, exit status 1.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

import click
import typer

from roma_vllm import __version__
from roma_vllm.errors import RomaError

# Exceptions typer/click use for control flow (an exit status, usage errors): passed on.
_CONTROL = (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort)


def issue_tracker() -> str:
    """Where to report a bug: the package's ``Issues`` URL when it declares one."""
    try:
        from importlib.metadata import metadata

        for entry in metadata("roma-vllm").get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("issues", "bug tracker", "bugs"):
                return url.strip()
    except Exception:  # no installed metadata: the generic wording below
        pass
    return "the roma-vllm issue tracker"


def bug_line(exc: BaseException) -> str:
    return (
        f"Bug: {type(exc).__name__} above is an internal error of roma-vllm {__version__}, "
        f"not a problem with your input; please report it, with this output, at {issue_tracker()}"
    )


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Run a command body: a :class:`RomaError` becomes ``Error: ...`` on stderr and exit
    status 1; any other exception prints its traceback and :func:`bug_line`, exit status 1."""
    try:
        yield
    except _CONTROL:
        raise
    except RomaError as e:
        typer.secho(f"Error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    except Exception as e:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        typer.secho(bug_line(e), fg="red", err=True)
        raise typer.Exit(1) from None
