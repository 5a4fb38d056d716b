"""Sampling on logits in numpy: repeat penalty, top-k, top-p, min-p, temperature."""

# Written here rather than left to llama.cpp's sampler chain because speculative
# sampling must apply exactly the same transformation to the target's and the
# draft's logits: `distribution` is that transformation, `sample` draws from it.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import sys
from typing import TYPE_CHECKING

from edgeinfer.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
else:
    # numpy, imported by the first Sampler: the catalog holds SamplingParams, and reading it (`edgeinfer
    # list`, `--help`) must not pay numpy's import.
    np = None

# A temperature below this (1e-310, say) has no finite inverse: it is taken as 0, greedy, which is what
# so small a temperature asks for anyway.
GREEDY_BELOW = 1 / sys.float_info.max


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; None is "not chosen": the model's recommendation (its catalog entry), else
    llama.cpp's default (LLAMA_CPP). `over` fills the gaps; the Sampler always does."""

    temperature: float | None = None  # 0 (or below GREEDY_BELOW) means greedy
    top_k: int | None = None  # 0 disables
    top_p: float | None = None  # 1 disables
    min_p: float | None = None  # 0 disables
    repeat_penalty: float | None = None  # 1 disables
    repeat_last_n: int | None = None
    seed: int | None = None  # None or -1: a random seed

    def __post_init__(self) -> None:
        for f in fields(self):
            if wrong := out_of_range(f.name, getattr(self, f.name)):
                raise UsageError(f"--{f.name.replace('_', '-')} {wrong}")

    def over(self, *fallbacks: "SamplingParams") -> "SamplingParams":
        """These settings, each one left unchosen taken from the first fallback that chose it."""
        chosen = {}
        for f in fields(self):
            layers = (getattr(layer, f.name) for layer in (self, *fallbacks))
            chosen[f.name] = next((value for value in layers if value is not None), None)
        return SamplingParams(**chosen)

    def chosen(self) -> dict[str, float | int]:
        """The settings given a value, by name (what a catalog entry recommends, say)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature < GREEDY_BELOW


_RANGES = {"temperature": ">= 0", "top_k": ">= 0", "top_p": "in (0, 1]", "min_p": "in [0, 1]",
           "repeat_penalty": "> 0", "repeat_last_n": ">= 0", "seed": "-1 (random, as in llama.cpp) or >= 0"}
_CHECKS = {"temperature": lambda v: v >= 0, "top_k": lambda v: v >= 0, "top_p": lambda v: 0 < v <= 1,
           "min_p": lambda v: 0 <= v <= 1, "repeat_penalty": lambda v: v > 0, "repeat_last_n": lambda v: v >= 0,
           "seed": lambda v: v >= -1}

def out_of_range(name: str, value: float | int | None) -> str | None:
    """What is wrong with a value of the setting `name` ("must be >= 0"), or None when nothing is."""
    return None if value is None or _CHECKS[name](value) else f"must be {_RANGES[name]}"


# llama.cpp's own defaults (common/common.h), for whatever neither the user nor the catalog chose.
LLAMA_CPP = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64)

# The settings `/set` (chat) and catalog entries name, with the type of their values.
WHOLE = ("top_k", "repeat_last_n", "seed")


def with_setting(params: SamplingParams, name: str, text: str) -> SamplingParams:
    """`params` with one setting changed from what a person typed (`top-k`, `40`); a bad name or value
    is a UsageError that says what would do."""
    key = name.lower().replace("-", "_")
    key = "temperature" if key == "temp" else key
    if key not in _RANGES:
        raise UsageError(f"unknown setting {name!r}; the settings are {', '.join(setting_names())}")
    try:
        value = int(text) if key in WHOLE else float(text)
    except ValueError:
        kind = "a whole number" if key in WHOLE else "a number"
        raise UsageError(f"{name} takes {kind}, not {text!r}") from None
    if wrong := out_of_range(key, value):
        raise UsageError(f"{name} {wrong}")
    return replace(params, **{key: value})


def setting_names() -> list[str]:
    return [name.replace("_", "-") for name in _RANGES]


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        global np
        import numpy as np

        self.params = params.over(LLAMA_CPP)
        self.rng = np.random.default_rng(None if self.params.seed == -1 else self.params.seed)

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
