"""Progress bars for the pipeline stages (rich), or nothing when disabled."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class Bars:
    """``with bars.task("snapshot", total) as advance: advance(n)``."""

    def __init__(self, enabled: bool = True, console: Any = None) -> None:
        self.enabled = enabled
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n, info=None: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, console=self.console) as p:
            tid = p.add_task(description, total=total, info="")

            def advance(n: int, info: str | None = None) -> None:
                p.update(tid, advance=n, **({"info": info} if info is not None else {}))

            yield advance


@contextlib.contextmanager
def shared_bars() -> Iterator[Callable[..., Callable[..., None]]]:
    """One transient rich display on stderr; yields ``new(description, total, done=0)``,
    which adds a bar and returns its ``advance(n, info=None)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:

        def new(description: str, total: int, done: int = 0) -> Callable[..., None]:
            task = bar.add_task(description, total=total, completed=done)
            return lambda n, info=None: bar.advance(task, n)

        yield new
