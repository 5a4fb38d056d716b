"""How many threads llama.cpp computes with: chosen from the cores free when a model loads, then adapted
while it generates, so that another busy program slows a run down instead of stalling it."""

# llama.cpp's threads meet at a barrier hundreds of times per token; when another program takes a core,
# one of them waits for its turn and the others wait for it. Fewer threads than cores then win. OpenMP's
# barrier spin is left at libgomp's default: no other setting measured better both idle and under load.
# The numbers and the reasons are in docs/threads.md.

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

def choose(usable: int, others_busy: float) -> int:
    """Threads for a model about to load: the usable cores less those other programs keep busy (a core
    half taken counts as taken), at least one."""
    return max(1, min(usable, int(usable - others_busy + 0.5)))


@dataclass
class ThreadTuner:
    """Picks the thread count for the next decode from the load other programs put on the CPU, looked at
    every LOOK seconds while generating. Numbers in, a thread count out; the engine applies it (llama.cpp
    lets it change between decodes).

    Trying more threads to see whether the load has gone is no way to find out: under load a single
    two-thread step took up to 17 times a one-thread one here, while /proc/stat tells it for free. Decode
    times are kept to say how much the load slowed the run, against the fastest decode of the same size.
    """

    most: int  # the usable cores: never more threads than that
    now: int  # the thread count in use
    others_at_load: float = 0.0  # cores other programs kept busy while the model loaded
    fixed: bool = False  # --threads was given: it is obeyed, the load only watched
    LOOK = 0.25  # seconds between looks at the load: /proc/stat counts in 10 ms ticks
    WINDOW = 4  # decodes judged together (medians: one late wake-up is not contention)
    SLOW = 1.5  # decodes this much slower than the fastest: the run was slowed down
    start: int = 0
    fastest: dict[int, float] = field(default_factory=dict)  # decode size -> the fastest seconds seen
    steps: deque = field(default_factory=lambda: deque(maxlen=32))  # the latest one-token decodes, seconds
    window: list[float] = field(default_factory=list)
    busiest: float = 0.0  # the most cores other programs kept busy at a look while generating
    slowest: float = 1.0  # the slowest window of the run, as a multiple of the fastest decodes
    changes: int = 0
    by_threads: dict[int, int] = field(default_factory=dict)  # decodes at each thread count

    def __post_init__(self) -> None:
        self.start = self.now

    def observe(self, size: int, seconds: float) -> None:
        """Record one decode of `size` tokens."""
        self.by_threads[self.now] = self.by_threads.get(self.now, 0) + 1
        if size == 1:
            self.steps.append(seconds)
        best = self.fastest.get(size)
        if best is None or seconds < best:
            self.fastest[size] = best = seconds
        self.window.append(seconds / best if best > 0 else 1.0)
        if len(self.window) == self.WINDOW:
            self.slowest = max(self.slowest, median(self.window))
            self.window.clear()

    def observe_load(self, others_busy: float) -> int:
        """Other programs kept `others_busy` cores busy since the last look; returns the threads to use."""
        self.busiest = max(self.busiest, others_busy)
        wanted = choose(self.most, others_busy)
        if wanted != self.now and not self.fixed:
            self.now, self.changes = wanted, self.changes + 1
        return self.now

    @property
    def contended(self) -> bool:
        """Did other programs share the CPU: busy at load or while generating, or decodes slowed down?"""
        return max(self.others_at_load, self.busiest) >= 0.5 or self.slowest > self.SLOW

    def typical_step(self) -> float | None:
        """The median of the latest one-token decodes (None before any)."""
        return median(self.steps) if self.steps else None

    def summary(self) -> dict:
        """What other programs' load did and what was done about it (for --stats and --json)."""
        return {"most": self.most, "fixed": self.fixed, "start": self.start, "end": self.now, "changes": self.changes,
                "others_at_load": round(self.others_at_load, 2), "slowest_vs_fastest": round(self.slowest, 2), "slowed": self.slowest > self.SLOW,
                "contended": self.contended, "decodes_by_threads": dict(sorted(self.by_threads.items()))}


def start(most: int, others_busy: float, fixed: bool = False) -> ThreadTuner:
    """The tuner of a model about to load, other programs keeping `others_busy` cores busy; `fixed`: use
    `most` threads whatever the load (--threads)."""
    return ThreadTuner(most, most if fixed else choose(most, others_busy), others_busy, fixed)

