"""Progress for long CLI work (on stderr, so stdout stays machine-readable): rich bars on a
terminal, plain lines everywhere else (a pipe, a log file, systemd's journal), where rich would
draw a bar only once it is finished."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

# soft_wrap: copy-paste commands in the banner stay on one line in logs and narrow terminals.
console = Console(stderr=True, soft_wrap=True)

StageProgress = Callable[[str, int, int], None]
"""progress(stage, done, total): one bar (or one run of lines) per stage."""

LINE_EVERY_S = 10.0
"""Without a terminal, a stage in progress prints a line this often."""


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console)


def stage_reporter(bar: Progress, title: str | None = None) -> StageProgress:
    """A ``progress(stage, done, total)`` that keeps one bar per stage."""
    tasks: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"{title}: {stage}" if title else stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return report


class StageLines:
    """``progress(stage, done, total)`` as lines: one when a stage starts, one every ``every_s``
    seconds while it runs (``warm-start 120/400``), one when it ends."""

    def __init__(self, title: str | None = None, every_s: float = LINE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix = f"{title}: " if title else ""
        self.every_s = every_s
        self.clock = clock
        self.started: dict[str, float] = {}
        self.last_line: dict[str, float] = {}
        self.ended: set[str] = set()

    def _line(self, stage: str, text: str) -> None:
        self.last_line[stage] = self.clock()
        console.print(f"{self.prefix}{stage}{text}", markup=False, highlight=False)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage not in self.started:
            self.started[stage] = now
            if done < total:
                self._line(stage, f" {done}/{total}…" if total > 1 else "…")
        if stage in self.ended:
            return
        if done >= total:
            self.ended.add(stage)
            self._line(stage, f" done ({now - self.started[stage]:.0f} s)")
        elif now - self.last_line[stage] >= self.every_s:
            self._line(stage, f" {done}/{total} ({now - self.started[stage]:.0f} s)")


@contextlib.contextmanager
def stage_progress(title: str | None = None) -> Iterator[StageProgress]:
    """Yields ``progress(stage, done, total)``: bars on a terminal, lines otherwise."""
    if not console.is_terminal:
        yield StageLines(title)
        return
    with progress_bar() as bar:
        yield stage_reporter(bar, title)
