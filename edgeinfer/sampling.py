"""Sampling on logits in numpy: repeat penalty, top-k, top-p, min-p, temperature."""

# Written here rather than left to llama.cpp's sampler chain because speculative
# sampling must apply exactly the same transformation to the target's and the
# draft's logits: `distribution` is that transformation, `sample` draws from it.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeinfer.errors import UsageError

# A temperature below this (1e-310, say) has no finite inverse: it is taken as 0, greedy, which is what
# so small a temperature asks for anyway.
GREEDY_BELOW = 1 / np.finfo(np.float64).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    min_p: float = 0.05  # 0 disables
    repeat_penalty: float = 1.0  # 1 disables
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "--temperature must be >= 0"),
            (self.top_k >= 0, "--top-k must be >= 0"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "--min-p must be in [0, 1]"),
            (self.repeat_penalty > 0, "--repeat-penalty must be > 0"),
            (self.repeat_last_n >= 0, "--repeat-last-n must be >= 0"),
            (self.seed is None or self.seed >= -1, "--seed must be -1 (random, as in llama.cpp) or >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(None if params.seed == -1 else params.seed)

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        if self.params.greedy and self.params.repeat_penalty == 1.0:
            return int(np.argmax(logits))  # the hot path of greedy decoding: no copies
        return self.draw(self.distribution(logits, history))

    def draw(self, probs: np.ndarray) -> int:
        """One token from a probability vector (which need not be normalised)."""
        cumulative = np.cumsum(probs, dtype=np.float64)
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return min(index, len(probs) - 1)

    def distribution(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The full next-token distribution after every transformation (zeros where excluded)."""
        p = self.params
        x = self._penalised(logits, history)
        probs = np.zeros(x.shape[0], dtype=np.float64)
        if p.greedy:
            probs[int(np.argmax(x))] = 1.0
            return probs
        ids = _top_k_ids(x, p.top_k)
        ids = ids[np.argsort(-x[ids], kind="stable")]
        kept = _softmax(x[ids])
        keep = np.ones(len(ids), dtype=bool)
        if p.top_p < 1.0:
            keep &= (np.cumsum(kept) - kept) < p.top_p
        if p.min_p > 0.0:
            keep &= kept >= p.min_p * kept[0]
        keep[0] = True
        ids = ids[keep]
        probs[ids] = _softmax(x[ids], p.temperature)
        return probs

    def _penalised(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float64)
        p = self.params
        if p.repeat_penalty == 1.0 or not history or p.repeat_last_n == 0:
            return x
        x = x.copy()
        recent = np.unique(np.asarray(history[-p.repeat_last_n :], dtype=np.int64))
        values = x[recent]
        x[recent] = np.where(values > 0, values / p.repeat_penalty, values * p.repeat_penalty)
        return x


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= x.shape[0]:
        return np.arange(x.shape[0])
    return np.argpartition(-x, k - 1)[:k]


def _softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    # The best logit is subtracted before dividing: the gaps are <= 0, so a small temperature can only
    # push them to -inf (probability 0), never the best one to +inf and the sum to inf - inf.
    with np.errstate(over="ignore"):
        e = np.exp((x - np.max(x)) / temperature)
    return e / e.sum()
