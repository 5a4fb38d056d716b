"""How long-running library calls report progress without printing."""

# The library calls these methods; the CLI implements them with rich (or not at
# all, when stderr is not a terminal), which keeps `--json` and pipes clean.

from __future__ import annotations

from typing import Protocol


class ProgressReporter(Protocol):
    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        """A new phase begins (a download, a checksum, a tensor pass)."""

    def advance(self, amount: int) -> None:
        """`amount` more units of the current phase are done."""

    def note(self, message: str) -> None:
        """A line worth telling the user (a fallback to another source, say)."""


class SilentProgress:
    def start(self, description: str, total: int | None, completed: int = 0) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass
