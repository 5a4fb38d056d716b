"""Where speculative tokens come from: a small draft model, or the context itself (prompt lookup).
Each proposed token carries the distribution q it was drawn from (None: a point mass), for verification."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgeinfer.engine import Model, common_prefix
from edgeinfer.sampling import Sampler


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    dists: list[np.ndarray | None] = field(default_factory=list)  # q for each token; None: a point mass
    catch_up_seconds: float = 0.0  # time spent evaluating a backlog (the prompt, plain rounds): not a draft step
    catch_up_tokens: int = 0  # how many tokens that backlog held
    source: str = ""  # what kind of proposal this is, for drafters whose proposals differ in quality
    sync_seconds: float = 0.0  # the first evaluation, re-syncing with the verified tokens (0: a catch-up did it)
    steps: int = 0  # one-token draft evaluations after that
    doubted: bool = False  # the drafter stopped short because it doubted its next token (--draft-p-min)


class Drafter(Protocol):
    """Proposes up to `n` tokens that continue `history`, each with the distribution it was drawn from (`q` in
    Leviathan et al.), or None when the drafter was certain (greedy drafting, or a copy out of the context),
    so that the verifier can accept it with probability min(1, p(x)/q(x))."""

    name: str
    step_cost_hint: float  # one draft step relative to one target step, before anything is measured

    def prepare(self, prompt: Sequence[int]) -> int:
        """Read the prompt while the target does (a model drafter's prefill); how many tokens it read."""

    def unread(self, prompt: Sequence[int]) -> int:
        """How many tokens of the prompt `prepare` would read (what its cache does not share with it)."""

    def copies_only(self) -> Drafter | None:
        """The drafter that stands in where reading the prompt would not pay: its copies out of the context
        alone (None: it has none to offer, or costs nothing to prepare)."""

    def propose(self, history: Sequence[int], n: int, sampler: Sampler, p_min: float) -> Draft:
        """Up to n tokens after history (whose last token is not yet in any cache)."""

    def copy(self, history: Sequence[int], n: int) -> Draft:
        """Up to n tokens copied out of the context, free to ask (an empty draft: no match, or no copying)."""

    def time_step(self, prompt: Sequence[int]) -> float | None:
        """Seconds for one draft step, timed after the prompt and forgotten (None: drafting costs nothing)."""


class ModelDrafter:
    """A small model with its own KV cache, kept in step with the target's accepted tokens.

    `Model.prefill` keeps the cached prefix the draft shares with the history, so
    after a verification only the bonus token (and the last accepted draft token,
    which the draft sampled but never evaluated) are evaluated again: the prefix
    is never re-processed, across rounds as across chat turns.

    With `lookup`, it also offers copies out of the context (prompt lookup): where an
    edit repeats its prompt a copy is surer than the draft and costs no draft step;
    the policy weighs the two each round, and the draft reads what it skipped in one batch later.
    """

    def __init__(self, model: Model, target_vocab: int, target_size: int, lookup: bool = True) -> None:
        self.model, self.name = model, model.path.name
        self.n_vocab = target_vocab
        self.step_cost_hint = step_cost_hint(model.info.file_size, target_size)
        self.lookup = lookup
        self._copies: NgramDrafter | None = None  # one index per generation: its history only grows

    def copy(self, history: Sequence[int], n: int) -> Draft:
        return self._copies.copy(history, n) if self._copies is not None else Draft()

    def unread(self, prompt: Sequence[int]) -> int:
        return len(prompt) - common_prefix(self.model.cached, prompt)

    def copies_only(self) -> NgramDrafter | None:
        return NgramDrafter() if self.lookup else None

    def prepare(self, prompt: Sequence[int]) -> int:
        self._copies = None
        if self.lookup:
            self._copies = NgramDrafter()
            self._copies.prepare(prompt)
        backlog = len(prompt) - len(self.model.cached)
        self.model.prefill(prompt)
        return backlog

    def time_step(self, prompt: Sequence[int]) -> float | None:
        base, best = len(self.model.cached), float("inf")
        for token in prompt[-3:]:
            start = time.perf_counter()
            self.model.decode([token])
            best = min(best, time.perf_counter() - start)
            self.model.truncate(base)
        return best

    def propose(self, history: Sequence[int], n: int, sampler: Sampler, p_min: float) -> Draft:
        draft, context = Draft(), list(history)
        start, backlog = time.perf_counter(), len(history) - len(self.model.cached)
        logits = self.model.prefill(history)
        if backlog > 2:  # after a verification the draft is at most two tokens behind; more is a one-off
            draft.catch_up_seconds, draft.catch_up_tokens = time.perf_counter() - start, backlog
        else:
            draft.sync_seconds = time.perf_counter() - start
        greedy = sampler.params.greedy
        for i in range(n):
            row = self._fit(logits)
            if greedy:
                token, q = sampler.sample(row, context), None
                confidence = _softmax_at(row, token)
            else:
                q = sampler.distribution(row, context)
                token = sampler.draw(q)
                confidence = float(q[token])
            if confidence < p_min:  # the draft is unsure: stop before wasting a verification slot
                draft.doubted = True
                break
            draft.tokens.append(token)
            draft.dists.append(q)
            context.append(token)
            if i == n - 1 or self.model.is_eog(token):
                break
            logits = self.model.decode([token])[0]
            draft.steps += 1
        return draft

    def _fit(self, logits: np.ndarray) -> np.ndarray:
        """The draft's logits over the target's vocabulary (the two may differ by a few padding tokens)."""
        if len(logits) == self.n_vocab:
            return logits
        if len(logits) > self.n_vocab:
            return logits[: self.n_vocab]
        return np.concatenate([logits, np.full(self.n_vocab - len(logits), -np.inf, dtype=logits.dtype)])


def step_cost_hint(draft_size: int, target_size: int) -> float:
    """A draft step against a target step before either is measured: the ratio of the files' sizes,
    since on a CPU one-token decoding reads every weight once (it errs low: small models are less efficient)."""
    return draft_size / max(target_size, 1)


class NgramDrafter:
    """Prompt-lookup decoding: copy what followed the last occurrence of the context's final n-gram.

    Code edits, summaries and quotes repeat long spans of their prompt; then this
    drafter is nearly free and nearly always right. The index of n-grams grows
    with the history, one position per token, so a lookup costs O(1).

    A copy's kind says where it comes from (the prompt, or the answer itself) as well
    as how long a match it follows: the kinds differ widely in how often they are
    right, so each keeps its own record (docs/speculative.md).
    """

    name = "ngram"
    step_cost_hint = 0.0

    def __init__(self, n_max: int = 4, n_min: int = 2) -> None:
        self.sizes = range(n_max, n_min - 1, -1)
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # positions of history whose n-grams are in the index
        self._prompt_len = 0  # positions before this are the prompt's; after, the answer's

    def unread(self, prompt: Sequence[int]) -> int:
        return 0

    def copies_only(self) -> None:
        return None

    def prepare(self, prompt: Sequence[int]) -> int:
        self._prompt_len = len(prompt)
        return 0  # the index grows with the history at each proposal

    def time_step(self, prompt: Sequence[int]) -> float | None:
        return None

    def propose(self, history: Sequence[int], n: int, sampler: Sampler, p_min: float) -> Draft:
        return self.copy(history, n)

    def copy(self, history: Sequence[int], n: int) -> Draft:
        self._extend(history)
        for size in self.sizes:
            if len(history) <= size:
                continue
            end = self._index.get(tuple(history[-size:]))
            if end is not None:
                tokens = list(history[end + 1 : end + 1 + n])
                origin = "prompt" if end < self._prompt_len else "answer"
                return Draft(tokens, [None] * len(tokens), source=f"{size}-gram from the {origin}")
        return Draft()

    def _extend(self, history: Sequence[int]) -> None:
        # Index n-grams ending before the last position: the lookup key itself must not match itself.
        for end in range(self._indexed, len(history) - 1):
            for size in self.sizes:
                if end + 1 >= size:
                    self._index[tuple(history[end + 1 - size : end + 1])] = end
        self._indexed = max(self._indexed, len(history) - 1)


def _softmax_at(logits: np.ndarray, token: int) -> float:
    """The probability of one token under the plain softmax of the logits.

    In float32, once over the vocabulary: it runs after every draft step, and a
    threshold test needs no more precision (float64 cost a noticeable share of a step).
    """
    x = np.asarray(logits, dtype=np.float32)
    top = x.max()
    return float(np.exp(x[token] - top) / np.exp(x - top).sum(dtype=np.float64))
