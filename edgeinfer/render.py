"""Rich renderings used by the CLI: progress bars that implement ProgressReporter.

Bars go to stderr and only when it is a terminal, so pipes and --json stay clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.markup import escape
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from edgeinfer.progress import ProgressReporter, SilentProgress


def print_note(console: Console, message: str) -> None:
    """A line worth telling the user beside the answer or the bar (a fallback, a setting that cost speed)."""
    console.print(f"[yellow]{escape(message)}[/]", highlight=False)


class RichProgress:
    """One visible bar at a time: each `start` finishes the previous phase."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(description, total=total, completed=completed)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def note(self, message: str) -> None:
        print_note(self._progress.console, message)


class _KeptNotes(SilentProgress):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def note(self, message: str) -> None:
        self.messages.append(message)


@contextmanager
def _notes_when_done(console: Console) -> Iterator[ProgressReporter]:
    """Off a terminal no bar, but the notes (a source failed and the next one served) once the work has
    succeeded: a log should say where a model came from; had the work failed, its error says it all."""
    kept = _KeptNotes()
    yield kept
    for message in kept.messages:
        console.print(message, highlight=False, markup=False)


@contextmanager
def transfer_progress(console: Console) -> Iterator[ProgressReporter]:
    """A byte-counting progress bar on a terminal; elsewhere only the notes, when done."""
    if not console.is_terminal:
        with _notes_when_done(console) as notes:
            yield notes
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield RichProgress(progress)


@contextmanager
def count_progress(console: Console) -> Iterator[ProgressReporter]:
    """A progress bar counting items (tensors, chunks) rather than bytes."""
    if not console.is_terminal:
        with _notes_when_done(console) as notes:
            yield notes
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield RichProgress(progress)
