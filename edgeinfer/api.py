"""The Python API, what the CLI calls: run, chat, bench (each prepared once, then run), pull, list, info,
remove, quantize, doctor. Functions return data and report progress through a callback; they never print.
docs/python-api.md shows it in use."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgeinfer.batchjob import INTERRUPTED, BatchItem, BatchResult, BatchSummary, answer_items, answer_one_at_a_time, in_order
from edgeinfer.engine import (MAX_SEQUENCES, GenerationResult, LoadOptions, check_context, ctrl_c_sets_flag, generate,
                              load)
from edgeinfer.errors import ChatTemplateError, EdgeinferError, Interrupted, UsageError
from edgeinfer.grammar import judged
from edgeinfer.ggufinfo import inspect
from edgeinfer.catalog import ModelSpec
from edgeinfer.library import Library, locate
from edgeinfer.references import CatalogRef
from edgeinfer.progress import ProgressReporter
from edgeinfer.sampling import LLAMA_CPP, SamplingParams
from edgeinfer.speculative import (DraftOptions, SpeculationPlan, check_pair, plan_speculation, resolve_draft,
                                   speculation)
from edgeinfer.speculative.plan import Workload
from edgeinfer.speculative.costs import CostBook
from edgeinfer.template import Message, chat_tokens, raw_tokens

if TYPE_CHECKING:  # (what only some commands need is imported where it is used)
    from edgeinfer.batchcost import BatchPlan
    from edgeinfer.bench import BenchResult
    from edgeinfer.chat import ChatSession
    from edgeinfer.doctor import Report
    from edgeinfer.ggufinfo import GGUFInfo
    from edgeinfer.grammar import Constraint
    from edgeinfer.library import ModelRow, PullResult, Removed
    from edgeinfer.quantize import QuantizeResult

__all__ = ["BatchItem", "BatchRequest", "BatchResult", "BatchSummary", "BenchRequest", "ChatRequest", "DraftOptions", "EdgeinferError", "Library", "LoadOptions", "Prepared",
           "RunRequest", "SamplingParams", "bench", "chat_template", "doctor", "info", "list_models", "model_and_prompt", "one_model",
           "open_chat", "prepare", "prepare_bench", "pull", "quantize", "recommended_settings",
           "remove", "run", "run_batch"]


# --- requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunRequest:
    """One prompt to answer (`edgeinfer run`)."""

    prompt: str
    model: str | None = None  # any model reference; None: the catalog's default
    system: str | None = None
    raw: bool = False  # plain completion, no chat template (special-token text in it is read as the tokens it names)
    parse_special: bool = False  # read special-token text in the prompt and system message as tokens, not text
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    load: LoadOptions = field(default_factory=LoadOptions)
    draft: DraftOptions | None = None  # speculative decoding: a draft model, or "ngram" (prompt lookup)
    constraint: Constraint | None = None  # structured output: --format json, --json-schema, --grammar (grammar.py)

    def __post_init__(self) -> None:
        """Checked here, as the request is made: before a missing model is pulled for it."""
        if not self.prompt.strip():
            raise UsageError("empty prompt: give one as an argument, on stdin, or with --file")
        check_max_tokens(self.max_tokens)

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class ChatRequest:
    """A conversation to hold (`edgeinfer chat`): the settings of every turn."""

    model: str | None = None
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    load: LoadOptions = field(default_factory=LoadOptions)
    draft: DraftOptions | None = None
    # Read special-token text in messages (`<|im_end|>`) as the tokens it names; by default only the
    # template's own markup becomes special tokens.
    parse_special: bool = False
    constraint: Constraint | None = None  # structured output for every answer (chat's /format and /schema change it)

    def __post_init__(self) -> None:
        check_max_tokens(self.max_tokens)


@dataclass(frozen=True)
class BenchRequest:
    """Throughput tests (`edgeinfer bench`): pp and tg like llama-bench, and with a draft plain against speculative."""

    models: tuple[str | None, ...] = (None,)  # model references; None: the catalog's default
    n_prompt: int = 512  # prompt tokens for the pp test (0 skips it)
    n_gen: int = 128  # generated tokens for the tg test (0 skips it)
    repetitions: int = 3
    load: LoadOptions = field(default_factory=LoadOptions)
    draft: DraftOptions | None = None
    parallel: tuple[int, ...] = ()  # sequences at once, for llama-batched-bench's table in place of pp and tg
    constraint: Constraint | None = None  # with it, greedy tg on a JSON prompt free and constrained, interleaved

    def __post_init__(self) -> None:
        if self.repetitions < 1 or self.n_prompt < 0 or self.n_gen < 0 or self.n_prompt + self.n_gen == 0:
            raise UsageError("bench needs --repetitions >= 1 and a positive --n-prompt or --n-gen")
        from edgeinfer.engine import MAX_SEQUENCES

        if self.parallel and (self.n_gen < 1 or not all(1 <= b <= MAX_SEQUENCES for b in self.parallel)):
            raise UsageError(f"bench --parallel takes sizes from 1 to {MAX_SEQUENCES} (e.g. 1,2,4,8) and a positive --n-gen")


@dataclass(frozen=True)
class BatchRequest:
    """Many prompts answered together (`edgeinfer run --batch`): the settings each item leaves unchosen,
    and how many sequences at once."""

    model: str | None = None
    system: str | None = None  # for the items that give none
    raw: bool = False  # items' prompts as plain completions (items with messages are refused)
    parse_special: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    load: LoadOptions = field(default_factory=LoadOptions)
    # Sequences at once; None: the fewest within 5% of the best aggregate speed measured here (the first run
    # measures it: batchcost), as many as fit in memory, at most 8 on a CPU.
    parallel: int | None = None
    step_tokens: int | None = None  # tokens one step evaluates at most; None: batch.DEFAULT_STEP
    # Speculative decoding: the requests are answered one at a time with it where its measured promise for one
    # sequence beats the batch's aggregate speed-up, else in plain batched steps (batchcost.speculate_or_batch).
    draft: DraftOptions | None = None
    constraint: Constraint | None = None  # structured output for the items that give none of their own

    def __post_init__(self) -> None:
        check_max_tokens(self.max_tokens)
        if self.parallel is not None and not 1 <= self.parallel <= MAX_SEQUENCES:
            raise UsageError(f"--parallel must be between 1 and {MAX_SEQUENCES}")


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")


# --- preparing: everything that may download or fail before weights load -----------------


@dataclass(frozen=True)
class Prepared:
    """A request with its model's file found (pulled if it was missing) and what its --draft comes to,
    checked and planned: what is left is to load and generate."""

    request: RunRequest | ChatRequest | BenchRequest | BatchRequest
    name: str  # the model's reference as given, or the catalog's default
    path: Path
    plan: SpeculationPlan
    notes: tuple[str, ...] = ()  # worth telling the user before the answer (a context past the model's own)
    cache_file: Path | None = None  # the store's cache of GGUF facts
    load: LoadOptions = field(default_factory=LoadOptions)  # the request's, with --cache-type auto decided
    # The request's sampling and --max-tokens, with what it leaves unchosen taken from the model's catalog entry
    # (its recommendation), else from llama.cpp's defaults.
    sampling: SamplingParams = LLAMA_CPP
    max_tokens: int | None = None
    batch: BatchPlan | None = None  # a batch's sequences at once (for its plain batched steps: `load` has them)


def prepare(request: RunRequest | ChatRequest | BatchRequest, progress: ProgressReporter | None = None, *,
            lib: Library | None = None) -> Prepared:
    """Find the request's model (pulled if missing, reported to `progress`), check that its context fits
    (for a batch, each of its sequences'), and resolve, pull and pair-check its draft, before any weights load."""
    lib = lib or Library.open()
    prepared = _prepare(lib, request, request.model, progress)
    return _with_sequences(prepared, lib) if isinstance(request, BatchRequest) else prepared


def _with_sequences(prepared: Prepared, lib: Library) -> Prepared:
    """A batch's sequences at once (batchcost.plan_batch: --parallel, else the best measured here, else as
    many as fit, for the run to measure), and its load options for plain batched steps with them counted."""
    from edgeinfer.batchcost import BatchCostBook, plan_batch
    from edgeinfer.engine import context_size

    info = inspect(prepared.path, prepared.cache_file)
    load_options = prepared.request.load.decided()  # (plain steps: plain's cache; a --draft's is its plan's)
    n_ctx = context_size(info, load_options)
    plan = plan_batch(prepared.path, info, n_ctx, load_options, prepared.request.parallel,
                      BatchCostBook(lib.store.batch_costs))
    check_context(info, n_ctx, load_options.kv_type, plan.loaded())
    return replace(prepared, load=replace(load_options, n_seq=plan.loaded()), batch=plan)


def prepare_bench(request: BenchRequest, progress: ProgressReporter | None = None, *,
                  lib: Library | None = None) -> list[Prepared]:
    """`prepare` for each model of a bench request."""
    lib = lib or Library.open()
    if request.n_gen or request.draft is None:
        return [_prepare(lib, request, ref, progress) for ref in request.models]
    # No tg test, nothing to speculate on; but a --draft that names no model is an error all the same,
    # and a missing draft is pulled, as bench always did.
    prepared = []
    for ref in request.models:
        prepared.append(_prepare(lib, replace(request, draft=None), ref, progress))
        resolve_draft(lib, ref, request.draft, progress)
    return prepared


def _prepare(lib: Library, request: RunRequest | ChatRequest | BenchRequest, ref: str | None,
             progress: ProgressReporter | None) -> Prepared:
    cache = lib.store.inspect_cache
    path = locate(lib, ref, pull_missing=True, progress=progress)
    # A context that cannot fit is an error here; one past the model's training, a note.
    # (a batch's sequences, when --parallel names how many: else as many as fit, decided by _with_sequences)
    note = check_context(inspect(path, cache), request.load.n_ctx, request.load.kv_type,
                         getattr(request, "parallel", None) or 1) if request.load.n_ctx else None
    sampling, max_tokens = _settings(request, _catalog_entry(lib, ref))
    plan = checked_plan(lib, ref, path, request.draft, request.load, progress, _workload(request, max_tokens))
    notes = tuple(n for n in (note, plan.change) if n)
    return Prepared(request, ref or lib.catalog.default, path, plan, notes, cache,
                    request.load.decided(plan.run_cache), sampling, max_tokens)


def _catalog_entry(lib: Library, ref: str | None) -> ModelSpec | None:
    """The catalog entry a reference names (its recommended settings apply), or None (a file, a hub model)."""
    parsed = lib.parse(ref)
    return parsed.spec if isinstance(parsed, CatalogRef) else None


def _settings(request: RunRequest | ChatRequest | BenchRequest,
              entry: ModelSpec | None) -> tuple[SamplingParams, int | None]:
    """Each sampling setting and the answer's length at most: the option, else the entry's, else llama.cpp's."""
    if isinstance(request, BenchRequest):  # (bench measures speed: its sampling is its own)
        return LLAMA_CPP, None
    recommended = entry.sampling if entry else SamplingParams()
    max_tokens = request.max_tokens if request.max_tokens is not None else entry and entry.max_tokens
    return request.sampling.over(recommended, LLAMA_CPP), max_tokens


def recommended_settings(ref: str | None = None, *, lib: Library | None = None) -> dict[str, float | int] | None:
    """The sampling settings (and max_tokens) a catalog model's entry recommends; None for a model not in
    the catalog."""
    entry = _catalog_entry(lib or Library.open(), ref)
    if entry is None:
        return None
    return {**entry.sampling.chosen(), **({"max_tokens": entry.max_tokens} if entry.max_tokens else {})}


def checked_plan(lib: Library, target_ref: str | None, target: Path, draft: DraftOptions | None,
                 load_options: LoadOptions, progress: ProgressReporter | None = None,
                 workload: Workload | None = None) -> SpeculationPlan:
    """What --draft comes to: the draft model's file, proven to pair with the target before any weights
    load, or prompt lookup, or plain decoding where earlier runs measured that speculation cannot win."""
    if draft is None:
        return SpeculationPlan(None)
    draft_path = resolve_draft(lib, target_ref, draft, progress)
    if draft_path is not None:
        check_pair(target, draft_path, lib.store.inspect_cache)
    return plan_speculation(target, draft_path, draft, load_options, CostBook(lib.store.speculation_costs), workload)


def _workload(request: RunRequest | ChatRequest | BenchRequest, max_tokens: int | None) -> Workload | None:
    """What a one-shot run asks of a draft model (a conversation or a benchmark loads it whatever it costs)."""
    if not isinstance(request, RunRequest):
        return None
    text = request.prompt + (request.system or "")
    return Workload(prompt_tokens=len(text) // 4 + 8, max_tokens=max_tokens)  # (+ the template's markup)


# --- running ------------------------------------------------------------------------


def run(prepared: Prepared | RunRequest, *, on_text: Callable[[str], None] | None = None,
        progress: ProgressReporter | None = None, lib: Library | None = None) -> GenerationResult:
    """Answer one prompt, streaming text through `on_text`. A RunRequest is prepared first (its model
    pulled if missing, reported to `progress`)."""
    if isinstance(prepared, RunRequest):
        prepared = prepare(prepared, progress, lib=lib)
    request, cache = prepared.request, prepared.cache_file
    with load(prepared.path, prepared.load, cache) as model, \
            speculation(model, prepared.plan, prepared.load, prepared.max_tokens, cache) as stepper_factory:
        tokens = raw_tokens(model, request.prompt) if request.raw else \
            chat_tokens(model, request.messages(), parse_special=request.parse_special)
        grammar = request.constraint.compile(model) if request.constraint else None
        result = generate(model, tokens, prepared.sampling, max_tokens=prepared.max_tokens, stop=request.stop,
                          on_text=on_text, stepper_factory=stepper_factory, grammar=grammar)
        return judged(result, request.constraint)


def run_batch(prepared: Prepared | BatchRequest, items: Iterable[BatchItem], *, ordered: bool = True,
              on_done: Callable[[BatchResult], None] | None = None, on_note: Callable[[str], None] | None = None,
              summary: BatchSummary | None = None, progress: ProgressReporter | None = None,
              lib: Library | None = None) -> Iterator[BatchResult]:
    """Answer many prompts, as many at once as the context holds (continuous batching: docs/batching.md).

    Results come in the items' order (`ordered`) or as each is complete; `on_done` hears of each as it
    completes either way (a progress bar). An item that cannot run (a bad line, a prompt too long for the
    context, a template that fails) gets a result with its error, and the others go on. Ctrl-C ends the
    batch between two steps: the results complete by then are yielded, then Interrupted is raised. A
    BatchRequest is prepared first (its model pulled if missing, reported to `progress`).

    `on_note` hears what was decided on the way, in a line each: the sequences at once, measured by the
    first run on this model here, and what a --draft came to. `summary` is filled in as the batch runs.
    """
    from edgeinfer.batchcost import speculate_or_batch
    from edgeinfer.speculative.plan import promised_speedup

    if isinstance(prepared, BatchRequest):
        prepared = prepare(prepared, progress, lib=lib)
    note, summary = on_note or (lambda _line: None), summary if summary is not None else BatchSummary()
    jobs = len(items) if isinstance(items, Sized) else None  # (never more sequences than requests)
    if prepared.plan.options is not None:
        speculative_load = prepared.request.load.decided(prepared.plan.run_cache)
        speculate, why = speculate_or_batch(promised_speedup(prepared.plan, prepared.path, speculative_load),
                                            prepared.batch.costs, prepared.batch.slots(jobs))
        note(why)
        if speculate:
            yield from _one_at_a_time(prepared, speculative_load, items, on_done, summary)
            return
    yield from _batched(prepared, items, jobs, ordered, on_done, note, summary)


def _batched(prepared: Prepared, items: Iterable[BatchItem], jobs: int | None, ordered: bool,
             on_done: Callable[[BatchResult], None] | None, note: Callable[[str], None],
             summary: BatchSummary) -> Iterator[BatchResult]:
    """The items in plain batched steps; a first run on this model here measures what a step costs first."""
    from edgeinfer.batchcost import measure

    plan = prepared.batch
    with load(prepared.path, replace(prepared.load, n_seq=plan.loaded(jobs)), prepared.cache_file) as model, \
            ctrl_c_sets_flag() as interrupted:
        if plan.measures:
            plan = plan.measured(measure(model, plan.sizes))
            plan.book.record(plan.key, plan.costs)
            note(f"measured {'again' if plan.again else 'once'} what a batched step costs here: "
                 f"{plan.costs.describe()}; {plan.parallel} "
                 f"sequence{'s' * (plan.parallel > 1)} at once ({plan.costs.speedup(plan.parallel):.2f}x one's "
                 "speed, within 5% of the best)")
        summary.parallel, summary.how = plan.slots(jobs), plan.how
        with _summing(model, summary, on_done) as done:
            results = answer_items(model, items, prepared.request, prepared.sampling, prepared.max_tokens,
                                   slots=plan.slots(jobs), stop=interrupted.is_set, on_done=done)
            yield from (in_order(results) if ordered else results)
        if interrupted.is_set():
            raise Interrupted(INTERRUPTED)


def _one_at_a_time(prepared: Prepared, load_options: LoadOptions, items: Iterable[BatchItem],
                   on_done: Callable[[BatchResult], None] | None, summary: BatchSummary) -> Iterator[BatchResult]:
    """The items one after another, each as `run --draft` answers it (speculative decoding, one sequence)."""
    request, cache = prepared.request, prepared.cache_file
    with load(prepared.path, load_options, cache) as model, \
            speculation(model, prepared.plan, load_options, prepared.max_tokens, cache) as factory, \
            ctrl_c_sets_flag() as interrupted:
        summary.parallel, summary.how = 1, "one at a time, speculative"
        with _summing(model, summary, on_done) as done:
            yield from answer_one_at_a_time(model, items, request, prepared.sampling, prepared.max_tokens, factory,
                                            stop=interrupted.is_set, on_done=done)


@contextmanager
def _summing(model, summary: BatchSummary, on_done: Callable[[BatchResult], None] | None) -> Iterator[Callable]:
    """A callback that adds each result to the summary before `on_done` hears of it; the steps and the time
    from here to the end of the block go to the summary too (also when Ctrl-C ends it)."""
    decodes = _decodes(model)
    start = time.perf_counter()

    def done(result: BatchResult) -> None:
        summary.add(result)
        if on_done is not None:
            on_done(result)

    try:
        yield done
    finally:
        summary.seconds += time.perf_counter() - start
        summary.steps += _decodes(model) - decodes


def _decodes(model) -> int:
    """The llama_decode calls the model made that found room (its thread tuner counts each)."""
    return sum(model.tuner.by_threads.values()) if model.tuner is not None else 0


@contextmanager
def open_chat(prepared: Prepared | ChatRequest, *, progress: ProgressReporter | None = None,
              lib: Library | None = None) -> Iterator[ChatSession]:
    """A chat session on the loaded model, with its draft if asked; both closed on exit. A ChatRequest is
    prepared first (its model pulled if missing)."""
    from edgeinfer.chat import ChatSession, Conversation

    if isinstance(prepared, ChatRequest):
        prepared = prepare(prepared, progress, lib=lib)
    request, cache = prepared.request, prepared.cache_file
    with load(prepared.path, prepared.load, cache) as loaded, \
            speculation(loaded, prepared.plan, prepared.load, prepared.max_tokens, cache) as factory:
        conversation = Conversation(model=prepared.name, sampling=prepared.sampling, system=request.system)
        yield ChatSession(loaded, conversation, max_tokens=prepared.max_tokens, stop=request.stop,
                          stepper_factory=factory, parse_special=request.parse_special, constraint=request.constraint)


def bench(prepared: Sequence[Prepared] | BenchRequest, progress: ProgressReporter | None = None, *,
          lib: Library | None = None) -> list[BenchResult]:
    """pp and tg figures of each prepared model, and with a draft plain against speculative generation
    on a code edit. A BenchRequest is prepared first."""
    from edgeinfer.bench import bench as measure, bench_speculative

    if isinstance(prepared, BenchRequest):
        prepared = prepare_bench(prepared, progress, lib=lib)
    results: list[BenchResult] = []
    for one in prepared:
        request, cache = one.request, one.cache_file
        if request.parallel:
            from edgeinfer.bench import bench_parallel

            results += bench_parallel(one.name, one.path, request.load, request.parallel, n_prompt=request.n_prompt,
                                      n_gen=request.n_gen, repetitions=request.repetitions, cache_file=cache,
                                      progress=progress)
            continue
        results += measure(one.name, one.path, request.load, n_prompt=request.n_prompt, n_gen=request.n_gen,
                           repetitions=request.repetitions, cache_file=cache, progress=progress)
        if request.constraint is not None and request.n_gen:
            from edgeinfer.bench import bench_structured

            results += bench_structured(one.name, one.path, request.load, request.constraint, n_gen=request.n_gen,
                                        repetitions=request.repetitions, cache_file=cache, progress=progress)
        if request.draft is not None and request.n_gen:
            # (plain and speculative on one target: both with the cache a --draft run gets)
            results += bench_speculative(one.name, one.path, one.load, one.plan,
                                         n_gen=request.n_gen,
                                         repetitions=request.repetitions, cache_file=cache, progress=progress)
    return results


# --- the store and the machine --------------------------------------------------------


def pull(ref: str | None = None, progress: ProgressReporter | None = None, *, lib: Library | None = None) -> PullResult:
    """Download a model into the store, verified by sha256 (None: the catalog's default model)."""
    from edgeinfer.library import pull as pull_model

    return pull_model(lib or Library.open(), ref, progress)


def list_models(*, lib: Library | None = None) -> list[ModelRow]:
    """The catalog's models and everything in the store."""
    from edgeinfer.library import list_models as rows

    return rows(lib or Library.open())


def info(ref: str | None = None, *, lib: Library | None = None) -> GGUFInfo:
    """The GGUF metadata of a model in the store or a local .gguf file (never downloads)."""
    from edgeinfer.library import model_path_for_info

    lib = lib or Library.open()
    return inspect(model_path_for_info(lib, ref), lib.store.inspect_cache)


def chat_template(ref: str | None = None, *, lib: Library | None = None) -> str:
    """The chat template (Jinja text) a model's GGUF carries; ChatTemplateError where it carries none."""
    meta = info(ref, lib=lib)
    if meta.chat_template is None:
        raise ChatTemplateError(f"{meta.path.name} carries no chat template (edgeinfer formats its chats with "
                                "ChatML, as llama.cpp does)")
    return meta.chat_template


def model_and_prompt(args: Sequence[str], model: str | None = None, *, more_text: bool = False,
                     lib: Library | None = None) -> tuple[str | None, str | None]:
    """`edgeinfer run`'s positional arguments: [MODEL] PROMPT, the first taken as the model when it names
    one (with `more_text`, the prompt comes from stdin or a file, and a lone argument may be the model)."""
    from edgeinfer.library import model_and_prompt as split

    return split(lib or Library.open(), args, model, more_text=more_text)


def one_model(argument: str | None, option: str | None) -> str | None:
    """The model of `edgeinfer chat [MODEL]`, given as the argument or with -m, not both."""
    from edgeinfer.library import one_model as chosen

    return chosen(argument, option)


def remove(ref: str, *, lib: Library | None = None) -> Removed:
    """Remove a model from the store (never a local file outside it)."""
    from edgeinfer.library import remove as remove_model

    return remove_model(lib or Library.open(), ref)


def quantize(source: str | Path, *, bits: int | None = None, qtype: str | None = None, output: Path | None = None,
             imatrix: Path | None = None, threads: int | None = None, force: bool = False, evaluate: bool = True,
             progress: ProgressReporter | None = None) -> QuantizeResult:
    """Quantize a model folder, hub repository, GGUF file or model reference to `bits` (4: Q4_K_M, the
    default; 8: Q8_0) or any llama.cpp `qtype`, into the store or `output`, with a quality report."""
    from edgeinfer.quantize import quantize as quantize_model, type_for

    return quantize_model(source, qtype=type_for(bits, qtype), output=output, imatrix=imatrix, threads=threads,
                          force=force, evaluate=evaluate, progress=progress)


def doctor(*, lib: Library | None = None) -> Report:
    """The llama.cpp build, its devices, memory and cores, the store, and which local models fit."""
    from edgeinfer.doctor import diagnose

    return diagnose(lib or Library.open())
