"""Speculative decoding: a drafter proposes tokens, the target verifies them all in one batch.

The stepper plugs into `engine.generate` like the plain one, so streaming, stop
strings, --max-tokens and KV reuse are the same code. It is exact: at
temperature 0 the output is token for token the target's own; with sampling,
each drafted token x is accepted with probability min(1, p(x)/q(x)) and a
rejection is resampled from max(0, p - q) (Leviathan et al. 2023; Chen et al.
2023), where p and q come from the same `Sampler.distribution`.

It is adaptive: a verification batch of n tokens is not free on a small CPU, and
its cost v(n) is neither linear nor monotonic in n. `costs.CostModel` holds v(n)
and the draft's costs on this machine, calibrated on first use and remembered
across runs in a `costs.CostBook`; the stepper picks the draft length with the
best expected tokens per second from those costs and the running rejection and doubt rates,
drafts nothing when plain decoding would be faster, and probes again when a
probe is cheap. `plan_speculation` decides before loading anything whether a
pair can win here at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeinfer.costs import CostBook, CostModel, Tally, expected_round, pair_key
from edgeinfer.drafters import Draft, Drafter, ModelDrafter, NgramDrafter, step_cost_hint
from edgeinfer.engine import LoadOptions, Model, PlainStepper, load
from edgeinfer.errors import IncompatibleModelsError, UsageError
from edgeinfer.machine import check_threads
from edgeinfer.sampling import Sampler

NGRAM, AUTO = "ngram", "auto"
NOT_EXACT = ("llama.cpp scores a pass of 2 tokens differently from two one-token steps with this model here, "
             "so verifying drafts could change the answer; nothing is verified")
_VOCAB_SLACK = 128  # converters pad vocabularies to a multiple of 64 or 128; those ids are never produced


@dataclass(frozen=True)
class DraftOptions:
    """How to speculate (the --draft* options of `edgeinfer run`, named as llama.cpp names them)."""

    ref: str  # a model reference, "auto" (the catalog's draft for the target) or "ngram" (prompt lookup)
    draft_max: int = 8  # --draft-max: never draft more tokens than this per round
    draft_min: int = 0  # --draft-min: a shorter draft is not worth a verification; decode plainly instead
    p_min: float = 0.75  # --draft-p-min: stop drafting when the draft's probability for its token is lower
    n_threads: int | None = None  # --draft-threads (None: the target's)
    n_gpu_layers: int | None = None  # --draft-gpu-layers (None: as for the target)
    lookup: bool = True  # --draft-lookup: a draft model's rounds may verify a copy out of the context instead
    adaptive: bool = True  # False: always draft up to draft_max (for tests and benchmarks)

    def __post_init__(self) -> None:
        if self.draft_max < 1:
            raise UsageError("--draft-max must be at least 1")
        if not 0 <= self.draft_min <= self.draft_max:
            raise UsageError("--draft-min must be between 0 and --draft-max")
        if not 0 <= self.p_min <= 1:
            raise UsageError("--draft-p-min must be in [0, 1]")
        check_threads(self.n_threads, "--draft-threads")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise UsageError("--draft-gpu-layers must be -1 (all), 0 or more")


# --- pairing ----------------------------------------------------------------------


def resolve_draft(lib, target_ref: str | None, options: DraftOptions, progress=None) -> Path | None:
    """The draft model's file (pulled if needed), or None for prompt lookup."""
    from edgeinfer.catalog import CatalogRef
    from edgeinfer.models import locate

    if options.ref == NGRAM:
        return None
    ref = options.ref
    if ref == AUTO:
        parsed = lib.parse(target_ref)
        ref = parsed.spec.draft if isinstance(parsed, CatalogRef) else None
        if not ref:
            raise UsageError(f"--draft auto: the catalog names no draft model for {target_ref or lib.catalog.default}; "
                             "give one with --draft MODEL, or use --draft ngram")
    return locate(lib, ref, pull_missing=True, progress=progress)


def check_pair(target: Path, draft: Path, cache_file: Path | None = None) -> None:
    """Raise IncompatibleModelsError unless the draft's tokens mean what the target's mean.

    Only metadata and vocabularies are read: the gguf reader's (cached) facts, then
    llama.cpp's own vocabulary loaded with vocab_only (no weights), whose token
    strings compare in a fraction of a second where the gguf reader takes seconds.
    """
    from edgeinfer.ggufinfo import inspect

    t, d = inspect(target, cache_file), inspect(draft, cache_file)
    names = f"the draft {draft.name} cannot pair with {target.name}"
    facts = [("tokenizer model", t.tokenizer_model, d.tokenizer_model), ("BOS token", t.bos_token_id, d.bos_token_id),
             ("EOS token", t.eos_token_id, d.eos_token_id), ("add-BOS flag", t.add_bos_token, d.add_bos_token)]
    for what, ours, theirs in facts:
        if ours != theirs:
            raise IncompatibleModelsError(f"{names}: {what} differs ({theirs!r} in the draft, {ours!r} in the target)")
    if abs(t.vocab_size - d.vocab_size) > _VOCAB_SLACK:
        raise IncompatibleModelsError(f"{names}: vocabularies of {d.vocab_size} and {t.vocab_size} tokens "
                                      f"(more than {_VOCAB_SLACK} apart)")
    ours, theirs = _token_texts(target), _token_texts(draft)
    for i in range(min(len(ours), len(theirs))):
        if ours[i] != theirs[i]:
            raise IncompatibleModelsError(f"{names}: token {i} is {theirs[i]!r} in the draft and {ours[i]!r} in the target")


def _token_texts(path: Path) -> list[bytes]:
    import llama_cpp

    from edgeinfer.engine import init_backend

    init_backend(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True  # the tokenizer only: no tensor is read
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise IncompatibleModelsError(f"llama.cpp could not read the vocabulary of {path.name}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return [llama_cpp.llama_vocab_get_text(vocab, i) for i in range(llama_cpp.llama_vocab_n_tokens(vocab))]
    finally:
        llama_cpp.llama_model_free(model)


@dataclass(frozen=True)
class SpeculationPlan:
    """What `--draft` comes to for one target on this machine, decided before any weights load."""

    options: DraftOptions | None  # None: plain decoding was asked for
    draft_path: Path | None = None  # None with options: prompt lookup
    book: CostBook = field(default_factory=lambda: _PROCESS_BOOK)
    skipped: str | None = None  # why speculation will not run although asked for (costs measured earlier)
    note: str | None = None  # what the plan changed: a draft model set aside for prompt lookup alone

    @property
    def drafter_name(self) -> str:
        return self.draft_path.name if self.draft_path else NGRAM

    @property
    def verifying(self) -> bool:
        return self.options is not None and self.skipped is None


def plan_speculation(target: Path, draft_path: Path | None, options: DraftOptions | None, load_options: LoadOptions,
                     book: CostBook) -> SpeculationPlan:
    """Speculate, or not: a pair whose remembered costs say that even a drafter that is always right
    would lose to plain decoding here is not loaded at all; nor one whose target scores no pass of two
    tokens exactly as two one-token steps (verifying could then change the answer).

    A draft model that cannot win here still leaves copies out of the context (--draft-lookup), which take
    no draft step: then prompt lookup runs alone, unless it too cannot win."""
    if options is None:
        return SpeculationPlan(None)
    plan = SpeculationPlan(options, draft_path, book)
    costs = book.peek(pair_key(target, plan.drafter_name, load_options.threads, load_options.n_gpu_layers,
                               load_options.cache_type))
    if costs is None or not costs.fresh:
        return plan
    cap = costs.verify_cap(options.draft_max)
    if cap < 1:
        return replace(plan, skipped=f"speculation off: {NOT_EXACT}")
    if cap < options.draft_min:
        if not costs.knows_exactness(options.draft_max + 1):
            return plan  # longer passes are yet to be tried: this run tries them
        return replace(plan, skipped=f"speculation off: --draft-min {options.draft_min} asks for more tokens than "
                                     f"the {cap} that one pass verifies exactly with this model here")
    if not options.adaptive or costs.measured(2) is None:
        return plan
    hint = step_cost_hint(draft_path.stat().st_size, target.stat().st_size) if draft_path is not None else 0.0
    if can_win(costs, hint, options, cap):
        return plan
    v = costs.ratios(3)
    why = (f"on this machine even drafts that were always right would be slower than plain decoding "
           f"(a pass of 2 tokens costs {v.get(2, 0):.2f}x one, a draft step {costs.draft_step(hint) * 1000:.1f} ms "
           f"against {costs.measured(1) * 1000:.1f} ms; measured by earlier runs)")
    if draft_path is not None and options.lookup:
        lookup = plan_speculation(target, None, options, load_options, book)
        if lookup.verifying:
            return replace(lookup, note=f"{draft_path.name} not loaded: {why}; copies out of the context only")
    return replace(plan, skipped=f"speculation off: {why}")


# llama.cpp pads the attention's KV length to a multiple of 256, and on the CPU it gives a one-token step
# over 512 or more of them a kernel that splits the KV between threads, while a pass of several tokens
# keeps another (flash attention, F16 cache): past 256 tokens of context a pass can then score otherwise
# than one-token steps, though it agreed bit for bit before. Which passes agree is measured on both sides.
LONG_CONTEXT = 256
LONG_PROBE = LONG_CONTEXT + 44  # where passes are tried past it


def exact_batch(target: Model, tokens: Sequence[int], upto: int, after: int = 0) -> int:
    """The largest pass, of up to `upto` tokens, whose logits agree bit for bit with one-token steps.

    Verifying a draft in one pass is exact only if the pass scores each position as a one-token step
    would; llama.cpp does not promise that. Where it repacks weights (Q4_K on AVX2: passes of 4 or more
    tokens go through a 4-row kernel) the logits move by up to 0.5 on Qwen2.5-1.5B, enough to break a
    near-tie the other way; some types differ even unrepacked (IQ4_NL), and passes of 8 or more take yet
    another kernel. Which sizes agree depends on the CPU, the type, the build and the context's length
    (LONG_CONTEXT), so it is measured, on a scratch context that leaves the prompt's cache alone, with
    the passes placed after `after` tokens of context."""
    seq = (list(tokens) * (after + upto))[: after + upto]
    # (past LONG_CONTEXT, room for the KV length llama.cpp pads to, which decides its kernel)
    with target.scratch(max(32, after + 2 * upto, 2 * LONG_CONTEXT if after else 0)) as scratch:
        if after:
            scratch.prefill(seq[:after])
        singles = np.stack([scratch.decode([t])[0].copy() for t in seq[after:]])
        for n in range(2, upto + 1):
            scratch.truncate(after)
            if not np.array_equal(scratch.decode(seq[after : after + n], all_logits=True), singles[:n]):
                return n - 1
    return upto


@contextmanager
def speculation(target: Model, plan: SpeculationPlan, target_load: LoadOptions, max_tokens: int | None = None,
                cache_file: Path | None = None) -> Iterator[Callable | None]:
    """Load the draft (if any) beside a loaded target; yields the stepper factory for `generate`.

    What the steppers measured is saved to the plan's cost book on the way out: their timings only if no
    other program shared the CPU meanwhile, so that a busy minute does not become the machine's figures.
    """
    options = plan.options
    if options is None:
        yield None
        return
    factory = modelless_factory(plan, max_tokens)
    if plan.skipped:
        yield factory
        _reexamine(plan, target)
        return
    loaded = [target]
    try:
        if factory is not None:
            yield factory
            return
        draft_load = replace(target_load, n_ctx=target.n_ctx, n_threads=options.n_threads or target_load.n_threads,
                             n_gpu_layers=options.n_gpu_layers if options.n_gpu_layers is not None
                             else target_load.n_gpu_layers)
        with load(plan.draft_path, draft_load, cache_file) as draft:
            loaded.append(draft)
            drafter = ModelDrafter(draft, target.n_vocab, target.info.file_size, lookup=options.lookup)
            yield stepper_factory(lambda: drafter, options, max_tokens, plan.book)
    finally:
        plan.book.save(trusted=not any(model.contended for model in loaded))


def _reexamine(plan: SpeculationPlan, target: Model) -> None:
    """A plan skipped on remembered timings is questioned when this run's plain steps were much faster than
    those (even beside another program: then the record came from a worse minute still): the next run
    measures again instead of staying plain."""
    step = target.tuner.typical_step() if target.tuner is not None else None
    costs = plan.book.peek(pair_key(target.path, plan.drafter_name, target.n_threads, target.n_gpu_layers,
                                    target.cache_type))
    if step is None or costs is None or not costs.outdated_by(step):
        return
    costs.forget_timings()
    plan.book.save()


def modelless_factory(plan: SpeculationPlan, max_tokens: int | None = None) -> Callable | None:
    """The stepper factory of a plan that loads no draft model (speculation off, or prompt lookup, perhaps
    in place of a draft model that cannot win); None for a plan that needs its draft model loaded."""
    if plan.skipped:
        return skipped_factory(plan)
    if plan.draft_path is None:
        return stepper_factory(NgramDrafter, plan.options, max_tokens, plan.book, plan.note)
    return None


def stepper_factory(make_drafter: Callable[[], Drafter], options: DraftOptions, max_tokens: int | None = None,
                    book: CostBook | None = None, note: str | None = None) -> Callable[[Model, Sampler], "SpeculativeStepper"]:
    def factory(target: Model, sampler: Sampler) -> SpeculativeStepper:
        drafter = make_drafter()
        stepper = SpeculativeStepper(target, sampler, drafter, options, cost_model(target, drafter, book), max_tokens)
        stepper.note = note
        return stepper

    return factory


_PROCESS_BOOK = CostBook(None)  # for callers that keep no file: chat turns and benchmark runs still share it


def cost_model(target: Model, drafter: Drafter, book: CostBook | None = None) -> CostModel:
    """The costs of this (CPU, threads, target, drafter, offload): remembered, or learned from here on."""
    return (book or _PROCESS_BOOK).get(pair_key(target.path, drafter.name, target.n_threads, target.n_gpu_layers,
                                                target.cache_type))


def skipped_factory(plan: SpeculationPlan) -> Callable[[Model, Sampler], PlainStepper]:
    """Plain decoding for a plan whose pair cannot win here, with stats that say so."""
    return lambda model, sampler: SkippedStepper(model, sampler, plan.drafter_name, plan.skipped)


class SkippedStepper(PlainStepper):
    """Plain decoding where speculation was asked for but cannot win here; its stats say why."""

    def __init__(self, model: Model, sampler: Sampler, drafter: str, reason: str) -> None:
        super().__init__(model, sampler)
        self.drafter, self.reason = drafter, reason

    def stats(self) -> dict:
        return {"drafter": self.drafter, "skipped": self.reason}


def rates(costs: CostModel, step_hint: float, options: DraftOptions, cap: int,
          reject: float, doubt: float = 0.0, copy: bool = False) -> dict[int, float]:
    """Expected tokens per second for each draft length up to cap, from the costs, the chance a proposed
    token is rejected and the chance the draft stops, unsure, at a position. A copy out of the context
    takes no draft step."""
    step, sync = (0.0, 0.0) if copy else (costs.draft_step(step_hint), costs.draft_sync(step_hint))
    passes = {n: costs.pass_cost(n) for n in range(1, cap + 2)}  # once, not once per length and stop
    out = {}
    for k in range(max(1, options.draft_min), cap + 1):
        tokens, seconds = expected_round(k, reject, doubt, step, passes.__getitem__, sync)
        out[k] = tokens / seconds
    return out


def can_win(costs: CostModel, step_hint: float, options: DraftOptions, cap: int, copy: bool = False) -> bool:
    """Could drafts (copies) that were always accepted beat plain decoding by the stepper's margin? If not,
    speculating only costs: neither the plan (loading the draft) nor a probe (asking it) is worth anything."""
    best = max(rates(costs, step_hint, options, cap, reject=0.0, copy=copy).values())
    return best > SpeculativeStepper.HYSTERESIS / costs.measured(1)


# --- the stepper --------------------------------------------------------------------


class SpeculativeStepper:
    """Draft, verify in one target pass, keep the accepted prefix and a bonus token."""

    HYSTERESIS = 1.03  # speculate only when it promises to be this much faster than plain decoding
    DECAY = 0.9  # the rejection and doubt rates forget old rounds at this rate per round
    # What earlier runs saw counts as this many tokens of evidence. A model drafter that stops must later
    # read all it missed before it can draft again, so one unlucky round must not stop it: about five
    # rounds' worth. Prompt lookup stops and starts for free and may follow the evidence closely.
    PRIOR_WEIGHT = {"model": 20.0, "free": 3.0}
    REALIZED_DECAY = 0.8  # the measured speed of each kind of round forgets at this rate per round
    PROBE_BUDGET = 2.0  # a probe may make the drafter catch up on at most this many plain steps' worth of time
    EXPLORE_GAP = 24  # speculative rounds before a neighbouring draft length whose pass was not timed is tried
    EXPLORE_FLOOR = 0.7  # ... if it promises at least this share of the best length's speed

    def __init__(self, target: Model, sampler: Sampler, drafter: Drafter, options: DraftOptions,
                 costs: CostModel, max_tokens: int | None = None) -> None:
        self.target, self.sampler, self.drafter, self.options = target, sampler, drafter, options
        self.costs, self.max_tokens = costs, max_tokens
        self.free = drafter.step_cost_hint == 0  # asking costs nothing (prompt lookup): look first, judge after
        self.prompt_len: int | None = None
        self.prior_weight = self.PRIOR_WEIGHT["free" if self.free else "model"]
        w = self.prior_weight  # they start from what earlier runs with this pair saw
        self.rejected = Tally(self.DECAY, w * costs.rejection_prior(), w)
        self.doubted = Tally(self.DECAY, w * costs.doubt_prior(), w)
        # Copies and the draft model's drafts are switched on and off apart: each has its own record.
        self.on = {"draft": False, "copy": False}
        self.off_rounds, self.probe_gap = {"draft": 0, "copy": 0}, {"draft": 8, "copy": 8}
        self.k = 0  # the length of the latest round that speculated (for the stats)
        self.unseen = 0  # tokens produced since the drafter last read the history: a probe's catch-up
        self.copied_behind = False  # copies left the draft model behind since it last read the history
        self.rent: tuple[float, float] | None = None  # (catch-up to beat, plain time spent) waiting for copies
        self.by_source: dict[str, Tally] = {}  # rejected among judged, per kind of copy (its match length)
        self.counts = dict(drafted=0, accepted=0, rejections=0, doubts=0, passes=0, speculative_passes=0, probes=0,
                           tokens=0, k_sum=0, copies=0, copied=0, explored=0)
        self.timed: dict[int, int] = {}  # pass size -> the speculative round that last timed one
        self.seconds = 0.0
        # What each kind of round really delivered, catch-ups and all: (tokens, seconds), decayed. Copies
        # out of the context and the draft model's drafts are judged apart: bad copies on new code must
        # not turn off a draft model that is winning there.
        self.realized = {kind: Tally(self.REALIZED_DECAY) for kind in ("plain", "draft", "copy")}
        self._catch_up = 0.0
        self.note: str | None = None  # what the plan changed (a draft model set aside), for the stats
        self.offered: list[tuple[int, Draft, int]] = []  # copies still to judge: where each starts, how much is judged

    def prepare(self, prompt: Sequence[int]) -> None:
        """The draft reads the prompt now, with the target, rather than in the first round; and on the first
        use of this pair on this machine, which passes are exact and what they cost are measured before
        they decide anything."""
        start = time.perf_counter()
        read = self.drafter.prepare(prompt)
        reading = time.perf_counter() - start
        upto = self.options.draft_max + 1
        if not self.costs.knows_exactness(upto):
            short, long = (exact_batch(self.target, prompt, upto, after) for after in (0, LONG_PROBE))
            self.costs.observe_exactness(short, upto, long)
        if self._verify_cap() < 1:
            self.note = NOT_EXACT
        if self.options.adaptive and self.costs.measured(2) is None and self._verify_cap() > 0:
            self._calibrate(prompt)
        if read > 2 and not self.costs.catch_ups:
            # A first guess at what reading a backlog costs the draft, the price of a probe (low: a long
            # prompt is read in bigger batches than a catch-up; real catch-ups replace it).
            self.costs.observe_catch_up(reading, read)

    def _calibrate(self, prompt: Sequence[int]) -> None:
        """Time one target pass of each size a round may verify, on the prompt's own tokens, then forget them.

        And one draft step. Once per (CPU, threads, target, drafter), remembered in the cost book:
        about as long as generating 40 tokens. Without it the first rounds guess at costs that, on a small CPU,
        decide between a speed-up and a loss, and an answer of a hundred tokens cannot win those back.
        """
        base = len(self.target.cached)
        sizes = min(self._verify_cap() + 1, self.target.n_ctx - base - 1, self.target.n_batch, len(prompt))
        for n in range(1, sizes + 1):
            start = time.perf_counter()
            self.target.decode(prompt[:n], all_logits=True)
            self.costs.observe_pass(n, time.perf_counter() - start)
            self.target.truncate(base)
        step = self.drafter.time_step(prompt)
        if step is not None:
            self.costs.observe_draft(step)

    def _verify_cap(self) -> int:
        return self.costs.verify_cap(self.options.draft_max)

    def advance(self, history: list[int]) -> list[int]:
        start = time.perf_counter()
        if self.prompt_len is None:
            self.prompt_len = len(history) - 1
        if self.options.adaptive:
            self._judge_copies(history)
            k, draft = self._look_first(history)
        else:
            k, draft = self._choose(history), None
        out = self._speculate(history, k, draft) if k else None
        asked = bool(k) and draft is None and not self.free  # the draft model was asked, and read the history
        # A round in which a model drafter was asked is speculative whatever it proposed: it paid for the asking.
        if out is None:
            kind = "draft" if asked else "plain"
            out = self._plain(history)
        else:
            kind = "copy" if draft is not None else "draft"
        self.unseen = 0 if asked else self.unseen + len(out)
        if asked or kind == "copy":  # caught up; or a copy came, and a later gap between copies waits afresh
            self.copied_behind, self.rent = not asked, None
        elapsed = time.perf_counter() - start
        # A catch-up (the draft reading the prompt, or what plain rounds produced) is paid once and
        # then sunk: it says nothing about what speculating from here on will deliver.
        self.realized[kind].add(len(out), elapsed - (self._catch_up if kind == "draft" else 0.0))
        self.counts["tokens"] += len(out)
        self.counts["passes"] += 1
        self.seconds += elapsed
        return out

    def _losing(self, kind: str) -> bool:
        """Have recent rounds of this kind ("draft" or "copy"), everything included, delivered fewer tokens
        per second than plain steps? The cost model predicts; this checks the prediction against the clock."""
        spec, plain = self.realized[kind], self.realized["plain"]  # tokens among seconds
        if spec.events < 6 or spec.trials <= 0:
            return False
        # Speculation on from the first round leaves no plain rounds to compare with: then a plain
        # step's measured cost stands in for them.
        plain_rate = plain.rate() if plain.events >= 3 and plain.trials > 0 else 1.0 / self.costs.measured(1)
        return spec.rate() < plain_rate

    def _plain(self, history: list[int]) -> list[int]:
        t0 = time.perf_counter()
        logits = self.target.decode(history[-1:])[0]
        self.costs.observe_pass(1, time.perf_counter() - t0)
        return [self.sampler.sample(logits, history)]

    def _look_first(self, history: list[int]) -> tuple[int, Draft | None]:
        """Copies out of the context cost nothing to ask for: ask first, then judge the copy by how often
        copies of its kind were accepted (after a 4-token match far surer than after a 2-token one).
        Verify it when it promises more than the draft model would and more than plain decoding;
        otherwise the draft model, if any, has its turn. Returns (length, the copy or None)."""
        cap = self._cap(history)
        if cap < max(1, self.options.draft_min) or self.costs.measured(1) is None:
            return 0, None  # (as _choose would say: nothing to draft, or v(1) still to measure)
        drafting = None if self.free else self._rates(cap)
        copy = self.drafter.copy(history, cap)
        if copy.tokens:
            self.offered.append((len(history), copy, 0))
        if len(copy.tokens) >= max(1, self.options.draft_min):  # (a copy cut off by the history's end may be short)
            copying = self._rates(len(copy.tokens), self._source_rejection(copy.source), copy=True)
            if drafting is None or self._copy_first(copying, drafting):
                k = self._decide(copying, len(copy.tokens), "copy")
                if k or drafting is None:
                    return k, copy
        k = 0 if drafting is None else self._decide(drafting, cap)
        if k and self.on["draft"] and self._wait_for_copies(drafting):
            return 0, None
        return k, None

    def _wait_for_copies(self, drafting: dict[int, float]) -> bool:
        """After a run of copies the draft model must read all it skipped before it drafts again, and where
        an edit repeats its prompt the next copy is often a token or two away. So, as one rents skis before
        buying: plain steps while what they have cost against drafting at once (the slower token, and one
        more token to read later) is less than that catch-up; within twice the better choice either way."""
        if not self.copied_behind:
            return False
        if self.rent is None:
            self.rent = (self._catch_up_cost(self.unseen, beyond_sync=True), 0.0)
        catch_up, spent = self.rent
        if spent >= catch_up:
            return False
        slower = max(0.0, self.costs.measured(1) - 1.0 / max(drafting.values()))
        self.rent = (catch_up, spent + slower + self._catch_up_cost(1))
        return True

    def _copy_first(self, copying: dict[int, float], drafting: dict[int, float]) -> bool:
        """Should the copy be weighed before the draft model has its turn? Where drafting would not beat
        plain decoding, yes: against plain steps a copy is judged as it is, since the draft model must
        later read plain tokens and copied ones alike. Against drafting it also pays that catch-up, as
        drafted tokens need none; less the re-sync that the catch-up does in passing and that a drafting
        round pays anyway."""
        if not self._promising(drafting, "draft"):
            return True
        k = max(copying, key=copying.get)
        seconds = self.costs.pass_cost(k + 1)  # a copy's round is one pass
        tokens = copying[k] * seconds  # expected per round
        return tokens / (seconds + self._catch_up_cost(tokens, beyond_sync=True)) >= max(drafting.values())

    def _catch_up_cost(self, tokens: float, beyond_sync: bool = False) -> float:
        """Seconds for the draft model to read this many tokens it skipped; beyond_sync: only what exceeds
        the re-sync that the catch-up does in passing and that a drafting round pays anyway."""
        hint = self.drafter.step_cost_hint
        seconds = tokens * self.costs.catch_up_per_token(hint)
        return max(0.0, seconds - self.costs.draft_sync(hint)) if beyond_sync else seconds

    def _judge_copies(self, history: list[int]) -> None:
        """Judge every copy offered, verified or passed over, against what the target has said since.

        A copy that is not verified costs nothing and is still evidence: were only verified copies
        judged, a kind whose record fell just short of paying would never be verified again, so never
        judged again, and stay off for the rest of the answer (an edit whose 4-token matches out of the
        prompt were copied 96% right went plain for 50 tokens after two early misses). Each token is
        judged as soon as it is said, and each kind's record takes one round's evidence at once. With
        sampling, a copied token is what the target says with the chance that verification accepts it:
        the same evidence."""
        evidence: dict[str, list[int]] = {}  # kind -> [wrong, judged]
        waiting = []
        for start, copy, seen in self.offered:
            said = history[start + seen : start + len(copy.tokens)]
            right = next((i for i, (a, b) in enumerate(zip(copy.tokens[seen:], said)) if a != b), len(said))
            wrong = right < len(said)
            tally = evidence.setdefault(copy.source, [0, 0])
            tally[0] += wrong
            tally[1] += right + wrong
            if not wrong and seen + right < len(copy.tokens):
                waiting.append((start, copy, seen + right))
        self.offered = waiting
        for source, (wrong, judged) in evidence.items():
            if judged:
                self._source_tally(source).add(wrong, judged)
                self.costs.observe_copy(source, judged, wrong)

    def _source_rejection(self, source: str) -> float:
        return self._source_tally(source).rate()

    def _source_tally(self, source: str) -> Tally:
        """The record of this kind of copy, started from what earlier runs saw of it. Passing over a copy
        costs nothing (the draft model, if any, drafts instead): the record may follow the evidence
        closely, whatever the drafter."""
        if source not in self.by_source:
            w = self.PRIOR_WEIGHT["free"]
            self.by_source[source] = Tally(self.DECAY, w * self.costs.copy_prior(source), w)
        return self.by_source[source]

    def _speculate(self, history: list[int], k: int, draft: Draft | None = None) -> list[int] | None:
        t0 = time.perf_counter()
        if draft is None:
            draft = self.drafter.propose(history, k, self.sampler, self.options.p_min)
        else:  # proposed before the length was chosen: keep k tokens
            draft = replace(draft, tokens=draft.tokens[:k], dists=draft.dists[:k])
        t1 = time.perf_counter()
        self._catch_up = draft.catch_up_seconds
        self.costs.observe_catch_up(draft.catch_up_seconds, draft.catch_up_tokens)
        if draft.sync_seconds:
            self.costs.observe_sync(draft.sync_seconds)
        if draft.steps:
            self.costs.observe_draft((t1 - t0 - draft.catch_up_seconds - draft.sync_seconds) / draft.steps)
        if not draft.tokens or len(draft.tokens) < self.options.draft_min:
            if not self.free:  # a draft model paid for its doubts and proposed too little to verify
                self._record(draft, 0, k, rejected=None)
            return None  # (prompt lookup found no match: that cost nothing and says nothing about its drafts)
        # Logits at every position of the batch: each one verifies the draft token after it.
        rows = self.target.decode([history[-1], *draft.tokens], all_logits=True)
        self.costs.observe_pass(len(draft.tokens) + 1, time.perf_counter() - t1)
        self.timed[len(draft.tokens) + 1] = self.counts["speculative_passes"]
        out, accepted = self._verify(rows, draft, history)
        self.target.truncate(len(history) + accepted)  # the rejected tail leaves the target's cache
        self._record(draft, accepted, k, rejected=accepted < len(draft.tokens) and not self.target.is_eog(out[-1]))
        return out

    def _verify(self, rows, draft: Draft, history: list[int]) -> tuple[list[int], int]:
        """The accepted draft prefix plus one token of the target's own (a correction or a bonus),
        and how many draft tokens were accepted."""
        sampler, out, context = self.sampler, [], list(history)
        for i, token in enumerate(draft.tokens):
            if sampler.params.greedy:
                best = sampler.sample(rows[i], context)
                if best != token:
                    return out + [best], i
            else:
                p = sampler.distribution(rows[i], context)
                q = draft.dists[i]
                q_token = 1.0 if q is None else float(q[token])
                if sampler.rng.random() * q_token >= p[token]:  # rejected with probability 1 - min(1, p/q)
                    return out + [sampler.draw(_residual(p, q, token))], i
            out.append(token)
            context.append(token)
            if self.target.is_eog(token):  # generation ends here: no bonus token
                return out, i + 1
        return out + [sampler.sample(rows[len(draft.tokens)], context)], len(draft.tokens)

    def _record(self, draft: Draft, accepted: int, k: int, rejected: bool | None) -> None:
        """One round's outcome, as the two rates the cost model needs: how often a proposed token is
        rejected (None: nothing was verified), and how often the draft stops, unsure, at a position it
        reached (each proposed token passed that test; a stop failed it). Prompt lookup tests nothing."""
        tests, verified = len(draft.tokens) + draft.doubted, rejected is not None
        # The tokens judged: the accepted ones and the one rejected; those after it were never judged.
        rejected = bool(rejected)
        judged = accepted + rejected
        c = self.counts
        if draft.source:  # a copy: judged for its kind with every copy offered (_judge_copies)
            c["copies"] += 1
            c["copied"] += accepted
        else:
            self.rejected.add(rejected, judged)
            self.doubted.add(draft.doubted, tests)
            self.costs.observe_round(judged, rejected, tests, draft.doubted)
        c["drafted"] += len(draft.tokens) if verified else 0
        c["accepted"] += accepted
        c["rejections"] += rejected
        c["doubts"] += draft.doubted
        c["speculative_passes"] += 1
        c["k_sum"] += k

    # --- choosing the draft length ---------------------------------------------

    @property
    def rejection(self) -> float:
        """The chance a proposed token is rejected, lately."""
        return self.rejected.rate()

    @property
    def doubt(self) -> float:
        """The chance the draft stops, unsure, at a position it reached, lately (0 for prompt lookup)."""
        return 0.0 if self.free else self.doubted.rate()

    def _cap(self, history: list[int]) -> int:
        """The longest draft this round may verify: --draft-max, the exact passes, the context, the batch,
        --max-tokens."""
        exact = self.costs.verify_cap(self.options.draft_max, self._long(len(history)))
        cap = min(exact, self.target.n_ctx - len(history), self.target.n_batch - 1)
        if self.max_tokens is not None:
            cap = min(cap, self.max_tokens - (len(history) - self.prompt_len) - 1)
        return cap

    def _choose(self, history: list[int], reject: float | None = None, limit: int | None = None) -> int:
        """The draft length for this round (at most `limit`, the tokens already proposed); 0: one plain step."""
        cap = self._cap(history) if limit is None else min(self._cap(history), limit)
        if cap < max(1, self.options.draft_min):
            return 0
        if not self.options.adaptive:
            self.k = cap
            return cap
        rates = self._rates(cap, reject)
        if rates is None:  # nothing measured yet: one plain step measures v(1)
            return 0
        return self._decide(rates, cap)

    def _promising(self, rates: dict[int, float], kind: str) -> bool:
        """Do these rates beat plain decoding, and has this kind of round not been losing to it lately?
        Turning speculation on takes a clear promise; once on, it stays while it is not a loss, since a
        model drafter that stops must later read everything it missed before it can draft again."""
        plain = (self.HYSTERESIS if not self.on[kind] else 1.0) / self.costs.measured(1)
        return max(rates.values()) > plain and not self._losing(kind)

    def _decide(self, rates: dict[int, float], cap: int, kind: str = "draft") -> int:
        """The best length of those rated if it beats plain decoding; else 0, or now and then a probe."""
        best = max(rates, key=rates.get)
        if self._promising(rates, kind):
            best = self._explore(rates, best)
            self.on[kind], self.off_rounds[kind], self.probe_gap[kind], self.k = True, 0, 8, best
            return best
        self.on[kind] = False
        self.off_rounds[kind] += 1
        if not can_win(self.costs, self.drafter.step_cost_hint, self.options, cap, copy=kind == "copy"):
            return 0  # perfect drafts would lose too
        # Has the text become predictable? Ask again now and then (a copy needs no catch-up to be verified).
        if self.off_rounds[kind] >= self.probe_gap[kind] and (kind == "copy" or self._affordable()):
            self.off_rounds[kind], self.probe_gap[kind] = 0, min(self.probe_gap[kind] * 2, 64)
            self.counts["probes"] += 1
            self.realized[kind] = Tally(self.REALIZED_DECAY)  # judge the probe on its own result
            return best
        return 0

    def _explore(self, rates: dict[int, float], best: int) -> int:
        """The best length, or now and then a neighbour whose pass has not been timed for a while.

        A length's cost rests on the few passes of its size timed so far (one, from calibration, on a
        pair's first run), and a size that a busy moment made look dear is never chosen, so never timed
        again, in this run or, through the cost book, the next: a Q4_K_M pass of 3 tokens once timed at
        2.9 steps instead of 2.3 kept prompt lookup to 1-token copies on code edits for a whole benchmark.
        A neighbour that promises at least EXPLORE_FLOOR of the best speed, once in EXPLORE_GAP rounds,
        costs at most 1.3% of the speed (if the estimate was right); the pass it times settles which of the two is better."""
        now = self.counts["speculative_passes"]
        stale = [n for n in (best + 1, best - 1) if n in rates and rates[n] >= self.EXPLORE_FLOOR * rates[best]
                 and now - self.timed.get(n + 1, 0) >= self.EXPLORE_GAP]
        if not stale:
            return best
        n = min(stale, key=lambda m: self.timed.get(m + 1, 0))
        self.timed[n + 1] = now  # asked for: a draft that stops short of it does not ask again at once
        self.counts["explored"] += 1
        return n

    def _affordable(self) -> bool:
        """A probe first makes a model drafter read every token it missed: worth it only while that costs
        no more than PROBE_BUDGET plain steps. Prompt lookup reads for free and may always probe."""
        return self._catch_up_cost(self.unseen) <= self.PROBE_BUDGET * self.costs.measured(1)

    def _rates(self, cap: int, reject: float | None = None, copy: bool = False) -> dict[int, float] | None:
        """Expected tokens per second for each draft length 1..cap, from the costs and the recent rates
        (copy: of a copy out of the context, which takes no draft step and tests no doubt)."""
        if self.costs.measured(1) is None:
            return None
        reject = self.rejection if reject is None else reject
        return rates(self.costs, self.drafter.step_cost_hint, self.options, cap, reject,
                     0.0 if copy else self.doubt, copy)

    def stats(self) -> dict:
        c = self.counts
        rounds = c["speculative_passes"]
        cut = self._long_context_note()
        return {
            "drafter": self.drafter.name,
            **({"note": self.note} if self.note else {}),
            # A user who asked for speed and got plain decoding there should learn why without --stats.
            **({"long_context": cut} if cut else {}),
            "drafted": c["drafted"],
            "accepted": c["accepted"],
            "rejections": c["rejections"],
            "doubts": c["doubts"],
            "copies": c["copies"],  # rounds that verified a copy out of the context
            "copied": c["copied"],  # accepted tokens that came from those copies
            "acceptance_rate": round(c["accepted"] / c["drafted"], 3) if c["drafted"] else 0.0,
            "target_passes": c["passes"],
            "speculative_passes": rounds,
            "tokens_per_pass": round(c["tokens"] / c["passes"], 3) if c["passes"] else 0.0,
            "draft_length": self.k,
            "mean_draft_length": round(c["k_sum"] / rounds, 2) if rounds else 0.0,
            "probes": c["probes"],
            "explored": c["explored"],  # rounds that tried a neighbouring length to time its pass again
            "tokens_per_second": round(c["tokens"] / self.seconds, 2) if self.seconds else 0.0,
            "pass_cost_ratios": self.costs.ratios(self.options.draft_max + 1),
            "exact_pass_limit": self._verify_cap() + 1,  # the largest pass verified: one that scores exactly
            "exact_pass_limit_long": self.costs.verify_cap(self.options.draft_max, long=True) + 1,  # past LONG_CONTEXT
            "draft_step_ms": round(self.costs.draft_step(self.drafter.step_cost_hint) * 1000, 2),
            "draft_sync_ms": round(self.costs.draft_sync(self.drafter.step_cost_hint) * 1000, 2),
        }

    def _long(self, history_len: int) -> bool:
        """Would a pass from here reach LONG_CONTEXT, past which other passes may score exactly?"""
        return history_len + self.options.draft_max >= LONG_CONTEXT

    def _long_context_note(self) -> str | None:
        """Say so where verification was cut back past LONG_CONTEXT, and what keeps it whole."""
        short, long = self._verify_cap(), self.costs.verify_cap(self.options.draft_max, long=True)
        went_long = self.prompt_len is not None and self._long(self.prompt_len + self.counts["tokens"])
        if not went_long or long >= short:
            return None
        where = f"only passes of up to {long + 1} tokens" if long > 0 else "no pass of 2 tokens or more"
        fix = "; --cache-type q8_0 or bf16 keeps them exact" if self.target.cache_type == "f16" else ""
        return (f"past {LONG_CONTEXT} tokens of context {where} score exactly as one-token steps here, "
                f"so no longer draft was verified there{fix}")


def _residual(p, q, token: int):
    """Where the target wants more than the draft offered: max(0, p - q) (unnormalised)."""
    residual = p.copy()
    if q is None:
        residual[token] = 0.0
    else:
        residual = (p - q).clip(min=0.0)
    return residual if residual.sum() > 0 else p


def describe_stats(stats: dict) -> str:
    """One line for people: what speculation did in a generation (`edgeinfer run --stats`)."""
    if stats.get("skipped"):
        return f"speculative ({stats['drafter']}): {stats['skipped']}"
    copies = (f", {stats['copied']} of them copied from the context" if stats["copied"] and stats["drafter"] != NGRAM
              else "")
    who = "; ".join([stats["drafter"], *(stats[k] for k in ("note", "long_context") if stats.get(k))])
    return (f"speculative ({who}): {stats['accepted']}/{stats['drafted']} drafted tokens accepted "
            f"({stats['acceptance_rate']:.0%}){copies}, {stats['doubts']} stops on doubt, "
            f"{stats['tokens_per_pass']:.2f} tokens per target pass, "
            f"draft length {stats['draft_length']} (mean {stats['mean_draft_length']}), "
            f"{stats['tokens_per_second']:.1f} tok/s")
