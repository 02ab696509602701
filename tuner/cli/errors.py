"""The one error handler of every `roma-tune` command.

An error the user can fix (:class:`roma_vllm.errors.RomaError`, whose message is one line)
prints as one red ``Error: ...`` line, exit status 1; so does the system refusing a file
operation for a reason outside the program (permissions, a full or read-only disk). Anything
else is a bug in roma-vllm: it keeps its full traceback, followed by one line asking for a
bug report, exit status 1.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

import click
import typer

from roma_vllm import __version__
from roma_vllm.errors import RomaError

# Exceptions typer/click use for control flow (an exit status, usage errors): passed on.
_CONTROL = (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort)
# OSError numbers that describe the machine, never the code: not a bug.
_ENVIRONMENT = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT}


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
    """Run a command body: a :class:`RomaError` (or an OSError of the machine, such as a full
    disk) becomes ``Error: ...`` on stderr and exit status 1; any other exception prints its
    traceback and :func:`bug_line`, exit status 1."""
    try:
        yield
    except _CONTROL:
        raise
    except RomaError as e:
        typer.secho(f"Error: {e}", fg="red", err=True)
        raise typer.Exit(1) from None
    except OSError as e:
        if e.errno not in _ENVIRONMENT:
            _bug(e)
        where = f"{e.filename}: " if e.filename else ""
        typer.secho(f"Error: {where}{e.strerror}", fg="red", err=True)
        raise typer.Exit(1) from None
    except Exception as e:
        _bug(e)


def _bug(e: BaseException) -> NoReturn:
    """The traceback, then :func:`bug_line`; exit status 1."""
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    typer.secho(bug_line(e), fg="red", err=True)
    raise typer.Exit(1) from None
