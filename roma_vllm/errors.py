"""The one family of errors a user can fix, shared by the plugin and the tuner.

Every error type of the project derives from :class:`RomaError` (and keeps a built-in base
such as ``ValueError`` where code catches that). Its message is one line: what is wrong,
where (file, flag, field, line) and how to fix it. ``roma-tune`` prints a ``RomaError`` as
that one line; any other exception is a bug and keeps its traceback
(:mod:`tuner.cli.errors`). Imports nothing, so any module may use it.
"""

from __future__ import annotations


class RomaError(Exception):
    """An error the user can fix; its message is one line."""


class MissingFileError(RomaError, FileNotFoundError):
    """A file or folder the user named does not exist, or lacks a file it needs."""
