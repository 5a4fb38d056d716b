"""What `--draft` comes to before a round runs: the options, the draft model's file, the pair check,
the plan (speculate or not, from remembered costs), the exactness measurement, and the context
manager that loads the draft beside a target and hands `generate` its stepper factory."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeinfer.engine import AUTO_CACHE, LoadOptions, Model, PlainStepper, load, vocabulary
from edgeinfer.errors import IncompatibleModelsError, ModelNotFoundError, UsageError
from edgeinfer.machine import check_threads
from edgeinfer.sampling import Sampler
from edgeinfer.speculative.costs import CostBook, CostModel, can_win, expected_speeds, pair_key, repays_loading
from edgeinfer.speculative.drafters import Drafter, ModelDrafter, NgramDrafter, step_cost_hint

if TYPE_CHECKING:
    from edgeinfer.speculative.stepper import SpeculativeStepper

NGRAM, AUTO = "ngram", "auto"
NOT_EXACT = ("llama.cpp scores a pass of 2 tokens differently from two one-token steps with this model here, "
             "so verifying drafts could change the answer; nothing is verified")
_VOCAB_SLACK = 128  # converters pad vocabularies to a multiple of 64 or 128; those ids are never produced
# llama.cpp pads the attention's KV length to a multiple of 256, and on the CPU (f16 cache) a one-token step
# over 512 or more of them takes another kernel than a pass of several tokens: past this many tokens of
# context a pass may score otherwise than one-token steps, though it agreed before. Measured on both sides.
LONG_CONTEXT = 256
LONG_PROBE = LONG_CONTEXT + 44  # where passes are tried past it
# The KV cache types whose passes stay exact past LONG_CONTEXT on the CPU; --cache-type auto takes the one this
# machine measured faster for speculation (choose_cache), trying each once, in this order.
SPECULATION_CACHES = ("q8_0", "bf16")
# Measuring a target's passes once costs about 40 one-token steps and loading a draft model more: an answer
# capped below this many tokens cannot repay it, so such a run does not start the learning (a longer one does).
LEARNING_ANSWER = 128


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


def gist(reason: str) -> str:
    """A reason without its figures in parentheses: the short line says why, --stats -v says how much."""
    return reason.split(" (", 1)[0]


# --- pairing ----------------------------------------------------------------------


def resolve_draft(lib, target_ref: str | None, options: DraftOptions, progress=None) -> Path | None:
    """The draft model's file (pulled if needed), or None for prompt lookup."""
    from edgeinfer.library import locate
    from edgeinfer.references import CatalogRef

    if options.ref == NGRAM:
        return None
    if options.ref != AUTO:
        try:
            return locate(lib, options.ref, pull_missing=True, progress=progress)
        except ModelNotFoundError as exc:  # (perhaps a mistyped keyword rather than a model)
            raise ModelNotFoundError(f"--draft {options.ref}: {exc}; --draft also takes 'auto' (the catalog's "
                                     "draft model) or 'ngram' (prompt lookup)") from None
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
    if t.vocab_digest is not None and t.vocab_digest == d.vocab_digest:
        return  # the same token strings, in order (remembered per file): nothing to compare
    ours, theirs = _token_texts(target), _token_texts(draft)
    for i in range(min(len(ours), len(theirs))):
        if ours[i] != theirs[i]:
            raise IncompatibleModelsError(f"{names}: token {i} is {theirs[i]!r} in the draft and {ours[i]!r} in the target")


def _token_texts(path: Path) -> list[bytes]:
    texts = vocabulary(path)
    if texts is None:
        raise IncompatibleModelsError(f"llama.cpp could not read the vocabulary of {path.name}")
    return texts


# --- the plan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one run asks of a draft, as known before anything loads."""

    prompt_tokens: int  # estimated (about 4 characters a token): the draft must read them too
    max_tokens: int | None = None

_IN_MEMORY_BOOK = CostBook(None)  # for callers that keep no file: chat turns and benchmark runs still share it


@dataclass(frozen=True)
class SpeculationPlan:
    """What `--draft` comes to for one target on this machine, decided before any weights load."""

    options: DraftOptions | None  # None: plain decoding was asked for
    draft_path: Path | None = None  # None with options: prompt lookup
    book: CostBook = field(default_factory=lambda: _IN_MEMORY_BOOK)
    skipped: str | None = None  # why speculation will not run although asked for (costs measured earlier)
    note: str | None = None  # what the plan changed: a draft model set aside for prompt lookup alone
    cache_type: str | None = None  # the KV cache type the run speculates with (--cache-type, auto decided)

    @property
    def drafter_name(self) -> str:
        return self.draft_path.name if self.draft_path else NGRAM

    @property
    def verifying(self) -> bool:
        return self.options is not None and self.skipped is None

    @property
    def run_cache(self) -> str | None:
        """The cache type the run loads with: the speculation's, unless speculation is off (then plain's)."""
        return None if self.skipped else self.cache_type

    @property
    def change(self) -> str | None:
        """One short line for the user when --draft will not run as asked (the figures: --stats --verbose)."""
        said = self.skipped or self.note
        return gist(said) if said else None


def plan_speculation(target: Path, draft_path: Path | None, options: DraftOptions | None, load_options: LoadOptions,
                     book: CostBook, workload: Workload | None = None) -> SpeculationPlan:
    """Speculate, or not: a pair whose remembered costs say that even a drafter that is always right
    would lose to plain decoding here is not loaded at all; nor one whose target scores no pass of two
    tokens exactly as two one-token steps (verifying could then change the answer).

    A draft model that cannot win here still leaves copies out of the context (--draft-lookup), which take
    no draft step: then prompt lookup runs alone, unless it too cannot win. So does a run (`workload`) whose
    answer would not repay loading the draft model and its reading of the prompt."""
    if options is None:
        return SpeculationPlan(None)
    learns = workload is None or workload.max_tokens is None or workload.max_tokens >= LEARNING_ANSWER
    if load_options.cache_type == AUTO_CACHE and load_options.on_cpu:
        load_options = load_options.decided(choose_cache(book, target, draft_path, load_options, options, learns))
    load_options = load_options.decided()  # (the cache type the run will have: part of the key)
    plan = SpeculationPlan(options, draft_path, book, cache_type=load_options.cache_type)
    costs = book.peek(pair_key(target, plan.drafter_name, load_options.threads, load_options.n_gpu_layers,
                               load_options.cache_type))
    if (costs is None or not costs.fresh or costs.measured(1) is None) and not learns:
        return replace(plan, skipped=f"speculation off: not yet measured on this machine, and an answer of at most "
                                     f"{workload.max_tokens} tokens would not repay measuring it; a run with -n "
                                     f"{LEARNING_ANSWER} or more, or none, measures it once")
    if costs is None or not costs.fresh:
        return plan
    cap = costs.verify_cap(options.draft_max)
    if cap < 1:
        return replace(plan, skipped=f"speculation off: {NOT_EXACT}")
    if cap < options.draft_min:
        if not costs.knows_exactness(options.draft_max + 1, long=False):  # (past 256 no more passes agree)
            return plan  # longer passes are yet to be tried: this run tries them
        return replace(plan, skipped=f"speculation off: --draft-min {options.draft_min} asks for more tokens than "
                                     f"the {cap} that one pass verifies exactly with this model here")
    if not options.adaptive or costs.measured(2) is None:
        return plan
    hint = step_cost_hint(draft_path.stat().st_size, target.stat().st_size) if draft_path is not None else 0.0
    if can_win(costs, hint, options.draft_min, cap):
        answer = costs.typical_answer(workload.max_tokens) if workload is not None and draft_path is not None else None
        if answer is None or repays_loading(costs, hint, cap, workload.prompt_tokens, answer, options.draft_min):
            return plan
        return _without_draft_model(plan, target, load_options, f"an answer of about {answer} tokens would not "
                                    "repay loading it and its reading of the prompt")
    v = costs.ratios(3)
    why = (f"on this machine even drafts that were always right would be slower than plain decoding "
           f"(a pass of 2 tokens costs {v.get(2, 0):.2f}x one, a draft step {costs.draft_step(hint) * 1000:.1f} ms "
           f"against {costs.measured(1) * 1000:.1f} ms; measured by earlier runs)")
    if draft_path is None:
        return replace(plan, skipped=f"speculation off: {why}")
    return _without_draft_model(plan, target, load_options, why)


def _without_draft_model(plan: SpeculationPlan, target: Path, load_options: LoadOptions, why: str) -> SpeculationPlan:
    """A plan whose draft model is not worth loading: prompt lookup alone (--draft-lookup) if it can win, else off."""
    if plan.options.lookup:
        lookup = plan_speculation(target, None, plan.options, load_options, plan.book)
        if lookup.verifying:
            return replace(lookup, note=f"{plan.draft_path.name} not loaded, copies out of the context only: {why}")
    return replace(plan, skipped=f"speculation off: {plan.draft_path.name} not loaded: {why}")


def choose_cache(book: CostBook, target: Path, draft_path: Path | None, load_options: LoadOptions,
                 options: DraftOptions, learns: bool = True) -> str:
    """--cache-type auto for a --draft run on the CPU: each of SPECULATION_CACHES is tried by one run (which
    measures its pass costs, as any first run of a pair does), then the one whose costs promise the faster
    speculation here is kept, as long as those costs are remembered. A run that does not learn (too short
    to repay it) takes the best of those already measured."""
    drafter = draft_path.name if draft_path is not None else NGRAM
    hint = step_cost_hint(draft_path.stat().st_size, target.stat().st_size) if draft_path is not None else 0.0
    speeds = {}
    for cache in SPECULATION_CACHES:
        costs = book.peek(pair_key(target, drafter, load_options.threads, load_options.n_gpu_layers, cache))
        untried = costs is None or not costs.fresh or (costs.verify_cap(options.draft_max) >= 1 and costs.measured(2) is None)
        if untried and learns:
            return cache
        if not untried:
            speeds[cache] = _promised_speed(costs, hint, options, copy=draft_path is None)
    return max(speeds, key=speeds.__getitem__) if speeds else SPECULATION_CACHES[0]


def promised_speedup(plan: SpeculationPlan, target: Path, load_options: LoadOptions) -> float | None:
    """How many times plain decoding's speed the plan promises one sequence, from the costs and rates earlier
    runs measured here (1.0: speculation is off; None: not measured yet). A batch weighs it against its own."""
    if not plan.verifying:
        return 1.0
    costs = plan.book.peek(pair_key(target, plan.drafter_name, load_options.threads, load_options.n_gpu_layers,
                                    plan.cache_type or load_options.kv_type))
    if costs is None or not costs.fresh or costs.measured(1) is None or costs.measured(2) is None:
        return None
    hint = step_cost_hint(plan.draft_path.stat().st_size, target.stat().st_size) if plan.draft_path else 0.0
    return max(1.0, _promised_speed(costs, hint, plan.options, copy=plan.draft_path is None) * costs.measured(1))


def _promised_speed(costs: CostModel, hint: float, options: DraftOptions, copy: bool) -> float:
    """Tokens per second the best draft length promises with these costs and the rates seen so far (0: no
    pass is exact)."""
    cap = costs.verify_cap(options.draft_max)
    if cap < 1:
        return 0.0
    return max(expected_speeds(costs, hint, options.draft_min, cap, reject=costs.rejection_prior(),
                               doubt=costs.doubt_prior(), copy=copy).values())


def exact_batch(target: Model, tokens: Sequence[int], upto: int, after: int = 0, timings: CostModel | None = None) -> int:
    """The largest pass, of up to `upto` tokens, whose logits agree bit for bit with one-token steps.

    Verifying a draft in one pass is exact only if the pass scores each position as a one-token step
    would, and llama.cpp does not promise that (repacked weights, other kernels for longer passes, and
    past LONG_CONTEXT another attention kernel; docs/speculative.md). Which sizes agree depends on the
    CPU, the type, the build and the context's length, so it is measured, on a scratch context that
    leaves the prompt's cache alone, with the passes placed after `after` tokens of context. The steps
    and passes are timed into `timings`: the pass costs a first run would otherwise measure again."""
    seq = (list(tokens) * (after + upto))[: after + upto]
    # (past LONG_CONTEXT, room for the KV length llama.cpp pads to, which decides its kernel)
    with target.scratch(max(32, after + 2 * upto, 2 * LONG_CONTEXT if after else 0)) as scratch:
        if after:
            scratch.prefill(seq[:after])
        singles = np.stack([_timed(scratch, [t], timings)[0].copy() for t in seq[after:]])
        for n in range(2, upto + 1):
            scratch.truncate(after)
            if not np.array_equal(_timed(scratch, seq[after : after + n], timings), singles[:n]):
                return n - 1
    return upto


def _timed(scratch: Model, tokens: Sequence[int], timings: CostModel | None) -> np.ndarray:
    start = time.perf_counter()
    rows = scratch.decode(tokens, all_logits=len(tokens) > 1)
    if timings is not None:
        timings.observe_pass(len(tokens), time.perf_counter() - start)
    return rows


def measure_exactness(target: Model, prompt: Sequence[int], costs: CostModel, upto: int, long: bool = True) -> None:
    """Which passes of up to `upto` tokens are exact, in a short context (timed into the costs) and, for a run
    that may reach LONG_CONTEXT, in a long one: a short answer to a short prompt does not pay for that probe's
    prefill."""
    short = exact_batch(target, prompt, upto, timings=costs)
    costs.observe_exactness(short, upto, exact_batch(target, prompt, upto, LONG_PROBE) if long else None)


# --- loading and the stepper factories ----------------------------------------------


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
        # (one sequence: the draft follows whichever sequence speculates, as a server's lone one)
        draft_load = replace(target_load, n_ctx=target.n_ctx, n_seq=1, n_cells=None,
                             n_threads=options.n_threads or target_load.n_threads,
                             n_gpu_layers=options.n_gpu_layers if options.n_gpu_layers is not None
                             else target_load.n_gpu_layers)
        start = time.perf_counter()
        with load(plan.draft_path, draft_load, cache_file) as draft:
            loaded.append(draft)
            # (a drafter per answer, each with its own index of copies; the draft model is one)
            drafter = functools.partial(ModelDrafter, draft, target.n_vocab, target.info.file_size, lookup=options.lookup)
            cost_model(target, drafter(), plan.book).observe_load(time.perf_counter() - start)
            yield stepper_factory(drafter, options, max_tokens, plan.book)
    finally:
        plan.book.save(trusted=not any(model.contended for model in loaded))


def _reexamine(plan: SpeculationPlan, target: Model) -> None:
    """A plan skipped on remembered timings is questioned when this run's plain steps were much faster than
    those (even beside another program: then the record came from a worse minute still): the next run
    measures again instead of staying plain."""
    step = target.tuner.typical_step() if target.tuner is not None else None
    costs = plan.book.peek(pair_key(target.path, plan.drafter_name, target.n_threads, target.n_gpu_layers,
                                    plan.cache_type or target.cache_type))
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
                    book: CostBook | None = None, note: str | None = None) -> Callable[..., SpeculativeStepper]:
    """A stepper per answer, on a target (a Model, or one sequence of a batch: batch.Lane) with that answer's
    sampler and, where answers differ in it (a server's requests), its own most tokens."""
    from edgeinfer.speculative.stepper import SpeculativeStepper  # (here: the stepper reads this module's plan)

    default = max_tokens

    def factory(target: Model, sampler: Sampler, max_tokens: int | None = default) -> SpeculativeStepper:
        drafter = make_drafter()
        stepper = SpeculativeStepper(target, sampler, drafter, options, cost_model(target, drafter, book), max_tokens)
        stepper.note = note
        return stepper

    return factory


def cost_model(target: Model, drafter: Drafter, book: CostBook | None = None) -> CostModel:
    """The costs of this (CPU, threads, target, drafter, offload): remembered, or learned from here on."""
    return (book or _IN_MEMORY_BOOK).get(pair_key(target.path, drafter.name, target.n_threads, target.n_gpu_layers,
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
        return {"drafter": self.drafter, "skipped": self.reason, "cache_type": self.model.cache_type}
