"""vLLM's output while `roma-tune eval` runs: kept in a log file unless ``--verbose``.

vLLM prints a few dozen lines per engine from three kinds of processes (this one, the engine
core, its workers), plus tqdm bars, library warnings and C++ messages. :class:`EngineLog`
sends all of it to a temporary log file:

* while the engine starts, file descriptors 1 and 2 point at the log, so the engine-core and
  worker processes started meanwhile inherit them and write there for their whole life;
* afterwards (generation, shutdown) this process's ``vllm`` logger writes to the log through
  a file handler; Python warnings go there throughout.

When start-up fails, or the engine dies later, :func:`root_cause` reads the exception the
engine processes logged, so the one-line error names the cause; the log file is kept and named. After a clean run the
log is deleted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# vLLM's line prefix: "(EngineCore pid=12) ERROR 12-04 19:56:15 [core.py:1510] "
_PREFIX = re.compile(r"^\([^)]*\)\s+[A-Z]+\s+\S+\s+\S+\s+\[[^\]]*\]\s?")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The last line of a traceback: "ValueError: ...", "roma_vllm.settings.RomaLoadError: ..."
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*(?:Error|Exception)): (.+)$")
# vLLM's engine core wraps a worker's error in this sentence
_WRAPPED = re.compile(r"^Worker failed with error '(.*)', please check the stack trace above")


def _exception_lines(text: str) -> list[tuple[str, str]]:
    found = []
    for raw in text.splitlines():
        line = _PREFIX.sub("", _ANSI.sub("", raw).strip())
        m = _EXCEPTION.match(line)
        if m:
            found.append((m.group(1), m.group(2).strip()))
    return found


def root_cause(text: str) -> str | None:
    """``Type: message`` of the exception that stopped vLLM, read from its log, or None.

    The last exception logged is the one that ended start-up; when it only wraps a worker's
    error, the worker's own exception (logged earlier, with its type) is named instead.
    """
    found = _exception_lines(text)
    if not found:
        return None
    name, message = found[-1]
    wrapped = _WRAPPED.match(message)
    if wrapped:
        inner = wrapped.group(1)
        for n, m in found:
            if m == inner:
                return f"{n}: {m}"
        return inner
    return f"{name}: {message}"


def one_line(error: BaseException) -> str:
    """An exception raised in this process as one line (pydantic: its error messages)."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            msgs = [str(e.get("msg", "")) for e in errors()]
            msgs = [m.removeprefix("Value error, ") for m in msgs if m]
            if msgs:
                return " ".join(" ".join(msgs).split())
    return " ".join(str(error).split()) or type(error).__name__


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]


def _fd_writer(fd: int) -> io.TextIOWrapper:
    """A text stream on descriptor ``fd`` that never closes it."""
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="replace", line_buffering=True
    )


class EngineLog:
    """Where one engine's output goes; ``verbose`` leaves it on the terminal."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.path: Path | None = None
        if not verbose:
            fd, name = tempfile.mkstemp(prefix="roma-eval-vllm-", suffix=".log")
            os.close(fd)
            self.path = Path(name)

    def text(self) -> str:
        if self.path is None or not self.path.exists():
            return ""
        return self.path.read_text(errors="replace")

    @contextlib.contextmanager
    def _warnings(self) -> Iterator[None]:
        """Python warnings of this process go to the log."""
        assert self.path is not None
        with warnings.catch_warnings(), open(self.path, "a", encoding="utf-8") as out:

            def show(message: Any, category: Any, filename: str, lineno: int, *_: Any) -> None:
                out.write(warnings.formatwarning(message, category, filename, lineno))
                out.flush()

            warnings.showwarning = show
            yield

    @contextlib.contextmanager
    def start_up(self) -> Iterator[None]:
        """Descriptors 1 and 2 point at the log: processes started now inherit them.

        vLLM (re)configures its logger while an engine starts; its handler writes to
        descriptor 1 too, so this process's start-up lines land in the log as well.
        """
        if self.path is None:
            yield
            return
        _flush()
        saved = (os.dup(1), os.dup(2))
        streams = (sys.stdout, sys.stderr)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # Python-level writers too (pytest, CliRunner and rich replace sys.stdout/err);
            # a handler bound now keeps writing to descriptor 1 or 2 afterwards
            sys.stdout, sys.stderr = _fd_writer(1), _fd_writer(2)
            with self._warnings():
                yield
        finally:
            _flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in (*saved, fd):
                os.close(f)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """After start-up: this process's ``vllm`` logger and Python warnings go to the log
        (generation, shutdown); vLLM's own handlers are put back afterwards."""
        if self.path is None:
            yield
            return
        logger = logging.getLogger("vllm")
        saved: tuple[Any, ...] = (logger.handlers[:], logger.propagate)
        handler = logging.FileHandler(self.path, encoding="utf-8")
        handler.setFormatter(
            logging.Formatter("(%(processName)s pid=%(process)d) %(levelname)s %(message)s")
        )
        logger.handlers = [handler]
        logger.propagate = False
        try:
            with self._warnings():
                yield
        finally:
            logger.handlers, logger.propagate = saved
            handler.close()

    def failure(self, error: BaseException) -> str:
        """Why the engine failed (at start-up or later), one line, and where the full log is."""
        here = one_line(error)
        if self.path is None:
            return f"{here}; see vLLM's log above"
        cause = root_cause(self.text()) if "root cause" in here.lower() else None
        return f"{cause or here} (vLLM's log: {self.path}; --verbose prints it)"

    def discard(self) -> None:
        """Delete the log after a clean run."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
