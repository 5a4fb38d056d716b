"""What speculation costs and yields for one pair of models on this machine, measured and remembered.

A verification pass of n tokens is not free on a small CPU and its cost v(n) is
neither linear nor monotonic in n; the draft's step and catch-up costs depend on
the draft, the threads and the CPU. Learning them inside one generation costs
rounds that a 128-token answer cannot win back, so what one run measured is kept
in a small JSON file beside the store and the next run starts from it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from statistics import median

_STALE_SECONDS = 7 * 24 * 3600  # a verdict older than this is learned again: machines and builds change


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round yields when each drafted token is accepted with probability alpha: accepted + bonus."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class CostModel:
    """Target pass costs v(n), the draft's step and catch-up costs, and the long-run acceptance.

    Medians of the last few observations, because a shared small machine has
    outliers. A pass size never measured is estimated from its measured
    neighbours, a little optimistically so that it gets tried once.
    """

    PRIOR_SLOPE = 0.5  # v(n)/v(1) grows by about this per extra token on the CPUs we know
    OPTIMISM = 0.85
    LONG_DECAY = 0.98  # the acceptance remembered across runs forgets at this rate per round

    def __init__(self, window: int = 7) -> None:
        self.window = window
        self.passes: dict[int, deque[float]] = {}
        self.draft_steps: deque[float] = deque(maxlen=window)
        self.catch_ups: deque[float] = deque(maxlen=window)  # seconds per token of a draft's catch-up
        self.chain = [0.0, 0.0]  # [continued, ended]: how often a drafted chain went on, decayed
        self.updated = 0.0  # when this was last measured (seconds since the epoch)

    # --- observing ---------------------------------------------------------------

    def observe_pass(self, n: int, seconds: float) -> None:
        self.passes.setdefault(n, deque(maxlen=self.window)).append(seconds)
        self.updated = time.time()

    def observe_draft(self, seconds_per_token: float) -> None:
        self.draft_steps.append(seconds_per_token)

    def observe_catch_up(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.catch_ups.append(seconds / tokens)

    def observe_round(self, continued: int, ended: bool) -> None:
        d = self.LONG_DECAY
        self.chain = [self.chain[0] * d + continued, self.chain[1] * d + (1 if ended else 0)]

    # --- estimates ---------------------------------------------------------------

    def measured(self, n: int) -> float | None:
        samples = self.passes.get(n)
        if not samples:
            return None
        # The first pass of a new size may also allocate llama.cpp's compute buffers: until there
        # are three samples, the fastest is the best guess.
        return min(samples) if len(samples) < 3 else median(samples)

    def pass_cost(self, n: int) -> float | None:
        """Seconds for one target pass of n tokens: measured, or estimated from the measured sizes."""
        own = self.measured(n)
        if own is not None:
            return own
        v1 = self.measured(1)
        if v1 is None:
            return None
        ratios = {m: self.measured(m) / v1 for m in self.passes if self.passes[m]}
        below = max(m for m in ratios if m < n)
        above = [m for m in ratios if m > n]
        if above:
            hi = min(above)
            ratio = ratios[below] + (ratios[hi] - ratios[below]) * (n - below) / (hi - below)
        else:
            ratio = ratios[below] + self.PRIOR_SLOPE * (n - below)
        return v1 * ratio * self.OPTIMISM

    def draft_step(self, hint: float) -> float:
        if self.draft_steps:
            return median(self.draft_steps)
        return hint * (self.measured(1) or 0.0)

    def catch_up_per_token(self, hint: float) -> float:
        """What the draft pays per token it must read after plain rounds (never more than a step)."""
        if self.catch_ups:
            return median(self.catch_ups)
        return self.draft_step(hint)

    def acceptance_prior(self, default: float = 0.6) -> float:
        """The chance a drafted chain goes on one more token, as earlier runs saw it."""
        go, end = self.chain
        return go / (go + end) if go + end >= 3 else default

    def ratios(self, upto: int) -> dict[int, float]:
        v1 = self.measured(1)
        return {n: round(self.measured(n) / v1, 2) for n in range(1, upto + 1) if v1 and self.measured(n)}

    # --- remembering -------------------------------------------------------------

    def to_json(self) -> dict:
        return {"passes": {str(n): list(v) for n, v in self.passes.items()}, "draft_steps": list(self.draft_steps),
                "catch_ups": list(self.catch_ups), "chain": self.chain, "updated": self.updated}

    @classmethod
    def from_json(cls, data: dict) -> "CostModel":
        model = cls()
        for n, samples in data.get("passes", {}).items():
            model.passes[int(n)] = deque((float(s) for s in samples), maxlen=model.window)
        model.draft_steps.extend(float(s) for s in data.get("draft_steps", []))
        model.catch_ups.extend(float(s) for s in data.get("catch_ups", []))
        chain = data.get("chain", [0.0, 0.0])
        model.chain = [float(chain[0]), float(chain[1])]
        model.updated = float(data.get("updated", 0.0))
        return model

    @property
    def fresh(self) -> bool:
        return time.time() - self.updated < _STALE_SECONDS


@dataclass(frozen=True)
class PairKey:
    """Whose costs these are: the CPU, the threads, the target file, the drafter, the offload."""

    cpu: str
    threads: int
    target: str  # file name and size: a requantized file under the same name is another model
    drafter: str
    gpu_layers: int | None

    def text(self) -> str:
        return json.dumps([self.cpu, self.threads, self.target, self.drafter, self.gpu_layers])


def pair_key(target: Path, drafter: str, threads: int, gpu_layers: int | None) -> PairKey:
    from edgeinfer import machine

    return PairKey(f"{machine.cpu_name()} {' '.join(machine.cpu_flags())}", threads,
                   f"{target.name}:{target.stat().st_size}", drafter, gpu_layers)


class CostBook:
    """The cost models of this process, loaded from and saved to one JSON file (None: memory only).

    Entries are merged into the file on save, so two runs at once lose at most
    each other's latest figures, never the file.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._models: dict[str, CostModel] = {}
        self._stored: dict | None = None  # the file as first read: the plan and the steppers share one read

    def peek(self, key: PairKey) -> CostModel | None:
        """The remembered model, or None: nothing is created."""
        text = key.text()
        if text not in self._models:
            if self._stored is None:
                self._stored = self._read()
            stored = self._stored.get(text)
            if not stored:
                return None
            self._models[text] = CostModel.from_json(stored)
        return self._models[text]

    def get(self, key: PairKey) -> CostModel:
        """The remembered model, or a new one that this book will save."""
        return self.peek(key) or self._models.setdefault(key.text(), CostModel())

    def save(self) -> None:
        if self.path is None or not self._models:
            return
        from edgeinfer.store import atomic_write_text

        data = self._read()  # again: another run may have saved since (merge, do not overwrite)
        data.update({k: m.to_json() for k, m in self._models.items() if m.passes})
        try:
            atomic_write_text(self.path, json.dumps(data))
        except OSError:
            pass  # a read-only home only costs the next run some learning

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
