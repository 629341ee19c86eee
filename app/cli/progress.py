"""Progress bars for long CLI work (on stderr, so stdout stays machine-readable)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

# soft_wrap: copy-paste commands in the banner stay on one line in logs and narrow terminals.
console = Console(stderr=True, soft_wrap=True)

StageProgress = Callable[[str, int, int], None]
"""progress(stage, done, total): one bar per stage."""


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console)


def stage_reporter(bar: Progress) -> StageProgress:
    """A ``progress(stage, done, total)`` that keeps one bar per stage."""
    tasks: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return report


@contextlib.contextmanager
def single_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """One bar; yields ``update(done, total)``."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
