"""Sampling on logits in numpy: repeat penalty, top-k, top-p, min-p, temperature."""

# Written here rather than left to llama.cpp's sampler chain because speculative
# sampling must apply exactly the same transformation to the target's and the
# draft's logits: `distribution` is that transformation, `sample` draws from it.

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import sys
from typing import TYPE_CHECKING

from edgeinfer.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from edgeinfer.grammar import Grammar, GrammarState
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
    """Draws tokens for one answer; with a grammar (structured output) it holds that answer's state in it."""

    def __init__(self, params: SamplingParams, grammar: Grammar | None = None) -> None:
        global np
        import numpy as np

        self.params = params.over(LLAMA_CPP)
        self.rng = np.random.default_rng(None if self.params.seed == -1 else self.params.seed)
        self.constraint: GrammarState | None = grammar.start() if grammar is not None else None

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        if self.constraint is not None:
            return self._constrained(logits, history)
        return self._sample(logits, history)

    def _sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        if self.params.greedy and self.params.repeat_penalty == 1.0:
            return int(np.argmax(logits))  # the hot path of greedy decoding: no copies
        return self.draw(self._distribution(logits, history))

    def _constrained(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """Sample as usual and ask the grammar about that token alone; only when it is refused, mask the whole
        vocabulary and sample again (llama.cpp's common sampler does the same). Greedy, that is the argmax of
        the masked logits; without top-k/top-p/min-p, the same distribution as masking first."""
        state = self.constraint
        state.follow(history)
        if state.complete:
            return state.grammar.end_token
        token = self._sample(logits, history)
        if state.allows(token):
            return token
        return self._sample(state.mask(logits, self._reach()), history)

    def _reach(self) -> int:
        """How many of the best allowed tokens a draw can reach: greedy the best one, with top-k the k best;
        0 (any of them) without top-k, or with a repeat penalty, which reorders them. The grammar looks for
        those among the best logits first (GrammarState.mask)."""
        p = self.params
        return 0 if p.repeat_penalty != 1.0 else 1 if p.greedy else p.top_k

    def fork(self) -> "Sampler":
        """This sampler for a drafter: the same settings and random numbers, its own copy of the grammar's
        state, so that drafts are proposed under the grammar without moving the answer's own state."""
        other = copy.copy(self)
        if self.constraint is not None:
            other.constraint = self.constraint.fork()
        return other

    def allowed(self, history: Sequence[int], tokens: Sequence[int]) -> int:
        """How many of `tokens`, after `history`, the grammar takes in a row (all of them without one): a copy
        out of the context is cut there before it is verified."""
        if self.constraint is None:
            return len(tokens)
        state = self.constraint.fork()
        state.follow(history)
        for n, token in enumerate(tokens):
            if state.complete:  # (a whole JSON value: only its end may follow)
                return n + (token == state.grammar.end_token)
            if not state.allows(token):
                return n
            state.accept(token)
        return len(tokens)

    def draw(self, probs: np.ndarray) -> int:
        """One token from a probability vector (which need not be normalised)."""
        cumulative = np.cumsum(probs, dtype=np.float64)
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return min(index, len(probs) - 1)

    def distribution(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The full next-token distribution after every transformation (zeros where excluded), the grammar's
        mask among them (speculative sampling's p and q). With top-k, only the k best allowed tokens can have
        a probability above 0, and they alone are normalised over, so the grammar's shortlist is exact here
        too: a token it leaves out (allowed or not) has a lower logit than all k (checked), and gets 0 either
        way. Without top-k, every allowed token has its share: the whole vocabulary is masked."""
        if self.constraint is not None:
            self.constraint.follow(history)
            if self.constraint.complete:
                probs = np.zeros(len(logits), dtype=np.float64)
                probs[self.constraint.grammar.end_token] = 1.0
                return probs
            logits = self.constraint.mask(logits, self._reach())
        return self._distribution(logits, history)

    def _distribution(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
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
