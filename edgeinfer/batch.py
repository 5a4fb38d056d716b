"""Many sequences in one llama.cpp context: continuous batching, chunked prefill, shared prefixes."""

# A `Batcher` holds up to model.n_seq sequences in one context (one KV cache for all) and moves them
# forward together: each `step` is one llama_decode with one token for every sequence that is generating,
# then chunks of the prompts being read, under a token budget, so that answers keep coming while a long
# prompt is read. A sequence that finishes leaves at once, its cells freed, and a waiting one takes its
# place at the next step; the cells it leaves stay in its place as a prefix for whoever comes next (the
# next turn of a conversation reads only its new tokens). Whom to admit and how much prompt to read is an
# `AdmissionPolicy`: numbers in, decisions out. `generate_one` is `run` and `chat`: a batch of one. A
# sequence that generates alone may take its steps through a stepper of its own instead (a server's --draft:
# speculative rounds on its `Lane`). docs/batching.md explains the step, admission, prefix sharing and exactness.

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from edgeinfer.engine import GenerationResult, Model, Stepper, common_prefix, ctrl_c_sets_flag
from edgeinfer.errors import GenerationError, UsageError
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.textstream import TextStream

if TYPE_CHECKING:
    from edgeinfer.grammar import Grammar

# Tokens one step evaluates at most. A generating sequence waits for the whole step, prompt chunks
# included: 128 tokens keep that wait near a second for a 1.5B model on 2 cores, while chunks that long
# already use the CPU's matrix kernels about as well as whole prompts do.
DEFAULT_STEP = 128
# A prefix at least this long is taken from a sequence that holds it rather than read again: a shorter
# one (the chat template's "<|im_start|>user\n") costs little to read and is not worth waiting for.
MIN_SHARED = 8


@dataclass(frozen=True)
class Job:
    """One prompt to answer, in tokens, with its own settings."""

    key: Hashable
    prompt: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)  # unchosen settings: llama.cpp's
    max_tokens: int | None = None  # None: until the sequence's context is full
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # the text as it comes (a server's stream)
    grammar: Grammar | None = None  # structured output: each sequence keeps its own state in its sampler


@dataclass(frozen=True)
class Answer:
    """A job's answer, or why it has none (`error`: its prompt cannot fit, its grammar found no way on)."""

    key: Hashable
    result: GenerationResult | None
    error: str | None = None

    @property
    def prompt_read(self) -> int:
        """Prompt tokens it evaluated itself; the others were kept in its place or given by a sequence."""
        return self.result.prompt_tokens - self.result.cached_tokens if self.result is not None else 0


@dataclass
class AdmissionPolicy:
    """Whom to admit, and how much prompt a step reads: numbers in, decisions out; no model needed."""

    slots: int  # sequences the context holds at once
    cells: int  # its KV cells, all sequences together
    step_tokens: int = DEFAULT_STEP  # tokens one step evaluates at most
    min_shared: int = MIN_SHARED
    most: int | None = None  # fewer sequences at once, learnt when llama.cpp found no cells for a step

    def __post_init__(self) -> None:
        if self.step_tokens < self.slots:  # (every generating sequence gets its token at every step)
            raise UsageError(f"a step of {self.step_tokens} tokens cannot serve {self.slots} sequences")

    def admits(self, live: int, held: int, prompt: int) -> bool:
        """May a sequence with `prompt` tokens join `live` sequences that hold `held` tokens?"""
        return live < min(self.slots, self.most or self.slots) and held + prompt <= self.cells

    def prompt_budget(self, generating: int) -> int:
        """The prompt tokens a step may read beside `generating` sequences' one token each."""
        return max(self.step_tokens - generating, 0)

    def worth_sharing(self, shared: int) -> bool:
        return shared >= self.min_shared

    def crowded(self, live: int) -> None:
        """llama.cpp found no cells for a step of `live` sequences: hold fewer from now on."""
        self.most = max(1, live - 1)


class Sequence:
    """One answer in the making: its tokens, how many of them the cache holds, its sampler and its text."""

    def __init__(self, job: Job, n_ctx: int) -> None:
        self.job = job
        self.tokens = list(job.prompt)  # the prompt, then each token sampled; those past n_cached are read next
        self.n_cached = 0
        self.slot = -1  # its sequence id in the context while it is admitted
        self.sampler, self.stream = Sampler(job.sampling, job.grammar), TextStream(job.stop)
        self.limit = job.max_tokens if job.max_tokens is not None else n_ctx
        self.donor: Sequence | None = None  # a sequence reading the prefix this one will be given
        self.wanted = 0  # how much of it
        self.read = 0
        self.started: float | None = None
        self.first: float | None = None
        self.cancelled: str | None = None  # the finish_reason a cancel gave it
        self.stepper: Stepper | None = None  # its rounds while it generates alone (Batcher's `solo`)
        self.lane: Lane | None = None

    @property
    def unread(self) -> int:
        return len(self.tokens) - self.n_cached

    @property
    def produced(self) -> int:
        return len(self.tokens) - len(self.job.prompt)

    def take(self, logits: np.ndarray, model: Model) -> str | None:
        """Sample the next token from this sequence's logits; the reason to finish, if there is one
        (the checks of engine.generate, in its order)."""
        return self.keep(self.sampler.sample(logits, self.tokens), model)

    def keep(self, token: int, model: Model) -> str | None:
        """A token sampled for this sequence: its text out, and the reason to finish, if there is one."""
        self.first = self.first or time.perf_counter()
        if model.is_eog(token):
            return "stop"
        self.tokens.append(token)
        text = self.stream.push(model.piece(token))
        if text and self.job.on_text is not None:
            self.job.on_text(text)
        if self.stream.stopped:
            return "stop"
        if self.produced >= self.limit:
            return "length"
        return "context" if len(self.tokens) > model.n_ctx else None

    def answer(self, reason: str, cache_type: str) -> Answer:
        rest = self.stream.flush()
        if rest and self.job.on_text is not None:
            self.job.on_text(rest)
        now = time.perf_counter()
        started = self.started or now
        produced = tuple(self.tokens[len(self.job.prompt):])
        result = GenerationResult(text=self.stream.text, finish_reason=reason, prompt_tokens=len(self.job.prompt),
                                  completion_tokens=len(produced), time_to_first_token=(self.first or now) - started,
                                  total_seconds=now - started, tokens=produced, cache_type=cache_type,
                                  cached_tokens=len(self.job.prompt) - self.read,
                                  stats=self.stepper.stats() if hasattr(self.stepper, "stats") else {})
        return Answer(self.job.key, result)


class Lane:
    """One sequence of a batch's context seen as a model of its own, for a stepper to drive (speculative
    rounds): decode and truncate at that sequence's positions; everything else is the model's."""

    def __init__(self, model: Model, seq: Sequence, make_room: Callable[[], bool]) -> None:
        self._model, self._seq, self._make_room = model, seq, make_room
        self.cached: list[int] = []
        self.sync()

    def __getattr__(self, name: str):  # n_ctx, n_batch, is_eog, scratch, path, cache_type...: the model's
        return getattr(self._model, name)

    def sync(self) -> None:
        """Take up the sequence's tokens where the batch's plain steps left them."""
        self.cached = self._seq.tokens[:self._seq.n_cached]

    def decode(self, tokens: list[int], *, all_logits: bool = False) -> np.ndarray:
        """As Model.decode, in this sequence; kept prefixes make room if the cells run short."""
        n, start = len(tokens), len(self.cached)
        if start + n > self._model.n_ctx:
            raise GenerationError(f"the context window ({self._model.n_ctx} tokens) is full")
        outputs = [all_logits or i == n - 1 for i in range(n)]
        while not self._model.decode_rows(tokens, range(start, start + n), [self._seq.slot] * n, outputs):
            if not self._make_room():
                raise GenerationError("the KV cache is full")
        self.cached.extend(tokens)
        return self._model.rows(0, n) if all_logits else self._model.rows(n - 1, 1)

    def truncate(self, n: int) -> None:
        self._model.forget(self._seq.slot, n)
        del self.cached[n:]


# A stepper for the sequence that generates alone, from its lane, its sampler and its most tokens
# (speculative.stepper_factory's factories are such).
Solo = Callable[[Lane, Sampler, int], Stepper]


class Batcher:
    """Sequences in one context, moved forward together, one llama_decode a step."""

    def __init__(self, model: Model, policy: AdmissionPolicy | None = None, solo: Solo | None = None) -> None:
        self.model, self.solo = model, solo
        # (one sequence reads its prompt in steps of n_batch, as llama.cpp does: nobody else waits for them)
        step = model.n_batch if model.n_seq == 1 else min(model.n_batch, max(DEFAULT_STEP, model.n_seq))
        self.policy = policy or AdmissionPolicy(model.n_seq, model.n_cells, step)
        if self.policy.step_tokens > model.n_batch or self.policy.slots > model.n_seq:
            raise UsageError(f"the context takes {model.n_seq} sequences and {model.n_batch} tokens a step")
        self.waiting: deque[Sequence] = deque()
        self.live: list[Sequence] = []  # in the order admitted
        self._free = list(range(self.policy.slots - 1, -1, -1))
        # Free places whose cells are kept from the answer that ended there, oldest first: the prefix the next
        # sequence placed there reuses. The model's own record of sequence 0 (`Model.cached`, what the last
        # run or chat turn left) is where a Batcher begins, and what close() leaves it.
        self.kept: dict[int, list[int]] = {}
        self.steps = self.preempted = 0
        for slot in range(1, model.n_seq):
            model.forget(slot)
        model.forget(0, len(model.cached))
        if model.cached:
            self.kept[0] = list(model.cached)

    @property
    def busy(self) -> bool:
        return bool(self.live or self.waiting)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def submit(self, job: Job) -> None:
        """Queue a job; a GenerationError (this job's alone) when its prompt cannot fit."""
        room = min(self.model.n_ctx, self.policy.cells)
        if not job.prompt:
            raise GenerationError("empty prompt: nothing to evaluate")
        if len(job.prompt) >= room:
            raise GenerationError(f"the prompt is {len(job.prompt)} tokens, the context holds {room}; "
                                  "shorten it or raise --ctx-size")
        self.waiting.append(Sequence(job, self.model.n_ctx))

    def cancel_all(self, reason: str = "cancelled") -> None:
        """End every job at the next step, waiting or admitted."""
        for seq in (*self.live, *self.waiting):
            seq.cancelled = seq.cancelled or reason

    @property
    def cells_used(self) -> int:
        """Positions the live sequences hold (a shared prefix counted for each)."""
        return sum(seq.n_cached for seq in self.live)

    @property
    def cells_kept(self) -> int:
        """Positions kept from finished answers: a cache, given up whenever cells run short."""
        return sum(len(tokens) for tokens in self.kept.values())

    def cancel(self, key: Hashable, reason: str = "cancelled") -> None:
        """End a job at the next step, waiting or admitted (its answer's finish_reason: `reason`)."""
        for seq in (*self.live, *self.waiting):
            if seq.job.key == key and seq.cancelled is None:
                seq.cancelled = reason

    def step(self) -> list[Answer]:
        """One llama_decode for the admitted sequences; the answers it (or a cancel) finished."""
        done = self._cancelled()
        self._admit()
        alone = self._alone()
        if alone is not None:
            return done + self._solo_round(alone)
        rows = self._rows()
        if not rows:
            return done
        if not self._decode(rows):
            return done + self._make_room()
        end = 0
        for seq, start, count in rows:
            seq.n_cached += count
            seq.read += max(0, min(start + count, len(seq.job.prompt)) - start)
            end += count
            if seq.unread == 0:
                try:
                    reason = seq.take(self.model.row(end - 1), self.model)
                except GenerationError as exc:  # (its grammar found no way on: this sequence's failure alone)
                    self._retire(seq)
                    done.append(Answer(seq.job.key, None, error=str(exc)))
                    continue
                if reason:
                    done.append(self._leave(seq, reason))
        return done

    def close(self) -> None:
        """Drop what is under way (a Ctrl-C); free every cell but those of sequence 0, which the model's
        record (`Model.cached`) then names: the next run or turn on this model may reuse them."""
        for seq in list(self.live):
            self._retire(seq)
        self.waiting.clear()
        for slot in range(1, self.model.n_seq):
            self.model.forget(slot)
        self.model.cached = self.kept.get(0, [])
        self.model.forget(0, len(self.model.cached))
        self.kept.clear()

    # --- the parts of a step ------------------------------------------------------------

    def _alone(self) -> Sequence | None:
        """The sequence that generates with nobody beside it or waiting, when it has a stepper of its own."""
        if self.solo is None or len(self.live) != 1 or self.waiting:
            return None
        seq = self.live[0]
        return seq if seq.unread == 1 and seq.donor is None else None

    def _solo_round(self, seq: Sequence) -> list[Answer]:
        """One round of the sequence's own stepper (made at its first: speculative decoding, several tokens
        from one target pass); its tokens are kept as a plain step keeps one, and the cells past what the
        sequence kept (a draft's tail after a stop) are freed."""
        if seq.stepper is None:
            # (to the stepper, what came before the last token is the prompt, and the last its first token)
            seq.lane = Lane(self.model, seq, self._drop_kept)
            seq.stepper = self.solo(seq.lane, seq.sampler, seq.limit - seq.produced + 1)
            seq.stepper.prepare(seq.tokens[:-1])
        seq.lane.sync()
        self.steps += 1
        reason, error = None, None
        try:
            for token in seq.stepper.advance(seq.tokens):
                if reason := seq.keep(token, self.model):
                    break
        except GenerationError as exc:  # (its grammar found no way on: this sequence's failure alone)
            error = str(exc)
        seq.n_cached = min(len(seq.lane.cached), len(seq.tokens))
        self.model.forget(seq.slot, seq.n_cached)
        if error is not None:
            self._retire(seq)
            return [Answer(seq.job.key, None, error=error)]
        return [self._leave(seq, reason)] if reason else []

    def _admit(self) -> None:
        """Waiting sequences take the places the policy allows, each where the cells kept hold the longest
        prefix of its tokens, unless a live sequence holds a longer one (it is then given that one)."""
        while self.waiting and self._free:
            seq = self.waiting[0]
            slot, reused = self._place(seq)
            if not self.policy.admits(len(self.live), self._held(besides=slot), len(seq.tokens)):
                if self.policy.admits(len(self.live), 0, 0) and self._drop_kept(besides=slot):
                    continue  # (the cells were short: the oldest kept prefix made room)
                return
            self.waiting.popleft()
            self._free.remove(slot)
            self.kept.pop(slot, None)
            seq.slot, seq.started = slot, seq.started or time.perf_counter()
            seq.donor, seq.wanted = self._donor(seq)
            if seq.donor is not None and seq.wanted >= reused + self.policy.min_shared:
                reused = 0  # (given the donor's cells: its own place must hold none)
            else:
                seq.donor, seq.wanted = None, 0
            self.model.forget(slot, reused)
            seq.n_cached = reused
            self.live.append(seq)
        for seq in self.live:
            if seq.donor is not None and seq.donor.n_cached >= seq.wanted:
                # (the donor has read that far: its cells become this sequence's too)
                self.model.share(seq.donor.slot, seq.slot, seq.wanted)
                seq.n_cached, seq.donor = seq.wanted, None

    def _place(self, seq: Sequence) -> tuple[int, int]:
        """The free place for a sequence, and how many of its tokens the cells kept there hold (its last
        token excepted: its logits are wanted). None held anywhere: an empty place, else the oldest kept."""
        most = len(seq.tokens) - 1
        shared = {slot: common_prefix(self.kept.get(slot, []), seq.tokens, most) for slot in self._free}
        best = max(shared, key=shared.get)
        if shared[best]:
            return best, shared[best]
        empty = [slot for slot in self._free if slot not in self.kept]
        return (empty[-1] if empty else next(iter(self.kept))), 0

    def _held(self, besides: int = -1) -> int:
        """The cells in use: live sequences' tokens and the prefixes kept (but the one at `besides`)."""
        kept = sum(len(tokens) for slot, tokens in self.kept.items() if slot != besides)
        return kept + sum(len(s.tokens) for s in self.live)

    def _drop_kept(self, besides: int = -1) -> bool:
        """Free the oldest kept prefix (not the one at `besides`); False when there is none."""
        slot = next((slot for slot in self.kept if slot != besides), None)
        if slot is None:
            return False
        self.model.forget(slot)
        del self.kept[slot]
        return True

    def _donor(self, seq: Sequence) -> tuple[Sequence | None, int]:
        """The live sequence whose tokens begin as this one's do for longest, and for how many tokens (the
        last prompt token excepted: its logits give the first token, so it is always read)."""
        best, length = None, 0
        for other in self.live:
            n = common_prefix(other.tokens, seq.tokens, len(seq.tokens) - 1)
            if n > length:
                best, length = other, n
        return (best, length) if self.policy.worth_sharing(length) else (None, 0)

    def _rows(self) -> list[tuple[Sequence, int, int]]:
        """What the step reads, (sequence, first position, tokens): each generating sequence's token, then
        chunks of the prompts in the order admitted, within the budget. A sequence waiting for a donor
        reads nothing."""
        ready = [s for s in self.live if s.donor is None]
        rows = [(s, s.n_cached, 1) for s in ready if s.unread == 1]
        budget = self.policy.prompt_budget(len(rows))
        for seq in ready:
            if seq.unread > 1 and budget > 0:
                rows.append((seq, seq.n_cached, min(seq.unread, budget)))
                budget -= rows[-1][2]
        return rows

    def _decode(self, rows: list[tuple[Sequence, int, int]]) -> bool:
        """One llama_decode of the rows, logits only where a token will be sampled (a row's last token,
        when it is its sequence's last): llama.cpp computes the output layer for those alone."""
        tokens, positions, ids, outputs = [], [], [], []
        for seq, start, count in rows:
            tokens += seq.tokens[start:start + count]
            positions += range(start, start + count)
            ids += [seq.slot] * count
            outputs += [False] * (count - 1) + [start + count == len(seq.tokens)]
        self.steps += 1
        return self.model.decode_rows(tokens, positions, ids, outputs)

    def _make_room(self) -> list[Answer]:
        """llama.cpp found no free cells for the step: the newest sequence gives its cells back and waits
        at the head of the queue (its tokens kept, read again when it returns), and the policy admits fewer.
        A sequence alone that finds no room has filled the cache: it ends as a full context ends. Kept
        prefixes go first."""
        if self._drop_kept():
            return []
        if len(self.live) == 1:
            return [self._leave(self.live[0], "context")]
        self.policy.crowded(len(self.live))
        seq = self.live[-1]
        self._release(seq)
        seq.n_cached, seq.donor = 0, None
        self.waiting.appendleft(seq)
        self.preempted += 1
        return []

    def _cancelled(self) -> list[Answer]:
        done = [self._leave(seq, seq.cancelled) for seq in list(self.live) if seq.cancelled]
        gone = [seq for seq in self.waiting if seq.cancelled]
        for seq in gone:
            self.waiting.remove(seq)
        return done + [seq.answer(seq.cancelled, self.model.cache_type) for seq in gone]

    def _leave(self, seq: Sequence, reason: str) -> Answer:
        self._retire(seq)
        return seq.answer(reason, self.model.cache_type)

    def _retire(self, seq: Sequence) -> None:
        """A sequence's answer is over: its place is given up, its cells kept there."""
        self._release(seq, keep=True)
        if seq.stepper is not None:
            seq.stepper.finish()

    def _release(self, seq: Sequence, keep: bool = False) -> None:
        """Give up a sequence's place; its cells stay there as a kept prefix (`keep`), else are freed (those
        it shares stay with the others)."""
        if keep:
            self.kept[seq.slot] = seq.tokens[:seq.n_cached]
        else:
            self.model.forget(seq.slot)
        self._free.append(seq.slot)
        self.live.remove(seq)
        seq.slot = -1
        for other in self.live:
            if other.donor is seq:
                other.donor, other.wanted = None, 0  # (it reads its prompt itself)


def generate_batch(model: Model, jobs: Iterable[Job], policy: AdmissionPolicy | None = None, *,
                   stop: Callable[[], bool] | None = None) -> Iterator[Answer]:
    """Answer every job, as many at once as the context holds, each answer as soon as it is complete.

    Jobs are taken from `jobs` only as places free up, so a long file is not read into tokens at once; a
    job whose prompt cannot fit is answered with its error. `stop`, asked between steps (Ctrl-C's flag),
    ends the batch there: the answers under way are dropped.
    """
    model.forget(-1)  # (a batch starts from an empty cache: its timings are its own)
    batcher = Batcher(model, policy)
    pending = iter(jobs)
    try:
        while True:
            yield from _fill(batcher, pending)
            if not batcher.busy or (stop is not None and stop()):
                return
            yield from batcher.step()
    finally:
        batcher.close()


def generate_one(model: Model, prompt: Iterable[int], sampling: SamplingParams = SamplingParams(), *,
                 max_tokens: int | None = None, stop: Iterable[str] = (),
                 on_text: Callable[[str], None] | None = None, grammar: Grammar | None = None) -> GenerationResult:
    """One answer (`run`, a chat turn): a batch of one sequence, which reuses the prefix sequence 0 holds
    and leaves its own there. Ctrl-C ends it after the step under way (finish_reason "interrupted"), the
    text so far kept; a prompt that cannot fit is a GenerationError."""
    start = time.perf_counter()
    batcher = Batcher(model)
    batcher.submit(Job(0, tuple(prompt), sampling, max_tokens, tuple(stop), on_text, grammar))
    done: list[Answer] = []
    with ctrl_c_sets_flag() as interrupted:
        try:
            while not done:
                if interrupted.is_set():
                    batcher.cancel(0, "interrupted")
                done = batcher.step()
            if done[0].result is None:
                raise GenerationError(done[0].error)
            waited = time.perf_counter() - start - done[0].result.total_seconds  # (before it was admitted)
        finally:
            batcher.close()
    result = done[0].result
    return replace(result, time_to_first_token=result.time_to_first_token + waited,
                   total_seconds=time.perf_counter() - start,
                   threads=model.tuner.summary() if model.tuner is not None else {})


def _fill(batcher: Batcher, pending: Iterator[Job]) -> Iterator[Answer]:
    """Queue jobs until there is one waiting for each free place (more would only wait longer)."""
    while len(batcher.waiting) < max(batcher.free_slots, 1):
        job = next(pending, None)
        if job is None:
            return
        try:
            batcher.submit(job)
        except GenerationError as exc:
            yield Answer(job.key, None, error=str(exc))
