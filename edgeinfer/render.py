"""Rich renderings used by the CLI: consoles that print text as text, and progress bars that
implement ProgressReporter."""

# Bars go to stderr and only when it is a terminal, so pipes and --json stay clean.

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from edgeinfer.progress import ProgressReporter, SilentProgress

if TYPE_CHECKING:  # (rich.progress is imported by the commands that draw a bar: the CLI starts faster)
    from rich.progress import Progress, TaskID

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def visible(text: str, *, newlines: bool = False) -> str:
    """`text` with each control character written out as an escape (ESC as `\\x1b`, a newline as `\\n`).

    Names in a GGUF file's metadata, in a hub's listing or in a saved conversation are an attacker's
    to choose: raw, an escape sequence in one could retitle the window, hide a link (OSC 8) or rewrite
    what is already on the screen. Newlines are kept only with `newlines=True`, for our own multi-line
    text; a value shown in a table cell or a one-line message keeps to its line.
    """
    return (_CONTROL_BUT_NEWLINE if newlines else _CONTROL).sub(lambda found: repr(found.group())[1:-1], text)


class TextConsole(Console):
    """A rich Console that prints every string as text: no markup, no :emoji: codes, and control
    characters made visible.

    Much of what the CLI prints comes from files and the network, where `[/bold]` would be a markup
    error and `\\x1b]0;...` a new window title. A deliberate style is a `Text` with that style (or, for a
    string whose outside pieces went through `rich.markup.escape`, `markup=True`).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"markup": False, "emoji": False, "highlight": False, **kwargs})

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(visible(text, newlines=True), **kwargs)


def print_error(console: Console, message: str) -> None:
    """The one line an error leaves: its message as text, on one line whatever it quotes."""
    console.print(Text.assemble(("error:", "bold red"), " ", visible(message)))


def print_note(console: Console, message: str) -> None:
    """A line worth telling the user beside the answer or the bar (a fallback, a setting that cost speed)."""
    console.print(Text(visible(message, newlines=True), style="yellow"))


class RichProgress:
    """One visible bar at a time: each `start` finishes the previous phase."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(visible(description), total=total, completed=completed)

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
        console.print(Text(visible(message, newlines=True)))


@contextmanager
def transfer_progress(console: Console) -> Iterator[ProgressReporter]:
    """A byte-counting progress bar on a terminal; elsewhere only the notes, when done."""
    if not console.is_terminal:
        with _notes_when_done(console) as notes:
            yield notes
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    # Binary units (MiB), as the catalog, `list` and `info` give sizes: rich's defaults are decimal (MB).
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(binary_units=True),
               _binary_speed_column(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield RichProgress(progress)


def _binary_speed_column():
    """rich's TransferSpeedColumn in KiB/s and MiB/s (it knows only kB/s and MB/s)."""
    from rich.filesize import pick_unit_and_suffix
    from rich.progress import ProgressColumn

    class BinarySpeedColumn(ProgressColumn):
        def render(self, task) -> Text:
            if task.finished_speed or task.speed:
                speed = int(task.finished_speed or task.speed)
                unit, suffix = pick_unit_and_suffix(speed, ["B", "KiB", "MiB", "GiB", "TiB"], 1024)
                return Text(f"{speed / unit:.1f} {suffix}/s", style="progress.data.speed")
            return Text("?", style="progress.data.speed")

    return BinarySpeedColumn()


@contextmanager
def count_progress(console: Console) -> Iterator[ProgressReporter]:
    """A progress bar counting items (tensors, chunks) rather than bytes."""
    if not console.is_terminal:
        with _notes_when_done(console) as notes:
            yield notes
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield RichProgress(progress)


@contextmanager
def batch_progress(console: Console, total: int) -> Iterator[Callable[[Any], None]]:
    """A bar of a batch's answers, done of all, with the tokens per second they came at, all sequences
    together; what it yields is told of each answer (a batchjob.BatchResult) as it completes."""
    if not console.is_terminal:
        yield lambda _result: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("answering"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    start, tokens = time.monotonic(), [0]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("answering", total=total, rate="")

        def done(result: Any) -> None:
            tokens[0] += result.result.completion_tokens if result.result is not None else 0
            rate = tokens[0] / max(time.monotonic() - start, 1e-9)
            progress.update(task, advance=1, rate=f"{rate:.1f} tok/s")

        yield done


def describe_stats(stats: dict, detailed: bool = False) -> str:
    """What speculation did in a generation, for people (`edgeinfer run --stats`): one short line, or with
    `detailed` (--verbose) every figure the stepper kept."""
    from edgeinfer.speculative.plan import gist

    who = f"speculative ({stats['drafter']}, {stats.get('cache_type')} cache)"
    if stats.get("skipped"):
        return f"{who}: {stats['skipped'] if detailed else gist(stats['skipped'])}"
    line = f"{who}: {stats['accepted']}/{stats['drafted']} drafted tokens accepted, " \
           f"{stats['tokens_per_pass']:.2f} tokens per target pass"
    if stats.get("speedup"):
        line += f", {stats['speedup']:.2f}x the plain speed measured here"
    notes = [stats[k] if detailed else gist(stats[k]) for k in ("note", "long_context") if stats.get(k)]
    line = "; ".join([line, *notes])
    if not detailed:
        return line
    return (f"{line}\n  acceptance {stats['acceptance_rate']:.0%}, {stats['copied']} accepted tokens copied from the "
            f"context in {stats['copies']} rounds, {stats['doubts']} stops on doubt, draft length "
            f"{stats['draft_length']} (mean {stats['mean_draft_length']}), {stats['tokens_per_second']:.1f} tok/s; "
            f"pass costs {stats['pass_cost_ratios']}, exact passes up to {stats['exact_pass_limit']} tokens "
            f"({stats['exact_pass_limit_long']} past 256), draft step {stats['draft_step_ms']} ms")


def describe_threads(summary: dict) -> str | None:
    """One sentence for --stats when other programs slowed the run, and what was done; None when they did not."""
    if not summary.get("contended"):
        return None
    said = [f"the CPU was shared: other programs kept {summary['others_at_load']:.1f} of {summary['most']} cores "
            f"busy at load" if summary["others_at_load"] >= 0.5 else "the CPU was shared"]
    if summary["slowed"]:
        said.append(f"steps took up to {summary['slowest_vs_fastest']:.1f}x the run's fastest")
    counts = ", ".join(f"{n} thread{'s' if n > 1 else ''} for {d}" for n, d in summary["decodes_by_threads"].items())
    said.append(f"ran {counts} decodes" if counts else f"ran {summary['start']} threads")
    if summary["fixed"]:
        said.append("--threads was kept as given")
    if summary["changes"]:
        said.append(f"the thread count changed {summary['changes']} times as the load came and went")
    return "; ".join(said)
