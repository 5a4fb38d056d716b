"""A batch job (`edgeinfer run --batch`): its requests read from JSON Lines, turned into jobs for the
batcher, and their answers written as JSON Lines, resumably."""

# A line that cannot be read becomes an item carrying its error, answered by an error line, so one bad line
# never costs the others; what makes the whole file unusable (not UTF-8, too large, an id given twice) is a
# UsageError before any work. Answers are written a whole line at a time and flushed, so a file cut short by
# Ctrl-C or a crash holds whole answers; a rerun skips the ids answered there and appends the rest.

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from edgeinfer.errors import ChatTemplateError, EdgeinferError, Interrupted, UsageError
from edgeinfer.sampling import SamplingParams, out_of_range
from edgeinfer.template import Message, chat_tokens, raw_tokens
from edgeinfer.textstream import is_text

if TYPE_CHECKING:
    from edgeinfer.api import BatchRequest
    from edgeinfer.batch import Job
    from edgeinfer.engine import GenerationResult, Model
    from edgeinfer.grammar import Constraint, Grammar

FILE_LIMIT = 256 << 20  # a batch file larger than this is a mistake (a binary file, /dev/zero)
_SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int}
INTERRUPTED = "interrupted: the answers complete by then are written"
_STRUCTURED = ("format", "json_schema", "grammar")  # structured output: "json" or a schema, a schema, GBNF text
_FIELDS = {"id", "prompt", "messages", "system", "max_tokens", "stop", *_SAMPLING, *_STRUCTURED}


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: a prompt or messages, with settings of its own over the batch's."""

    id: str | int | None
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None  # None: the batch's
    constraint: Constraint | None = None  # structured output; None: the batch's
    error: str | None = None  # a line that could not be read: answered with this, never run
    line: int = 0  # its line in the file (0: not from a file)


@dataclass(frozen=True)
class BatchResult:
    """An item's answer, or its error; `index` is the item's place in the batch."""

    id: str | int | None
    index: int
    result: GenerationResult | None = None
    error: str | None = None

    @property
    def prompt_read(self) -> int:
        """Prompt tokens evaluated; the rest were kept from an earlier answer or given by a sequence."""
        return self.result.prompt_tokens - self.result.cached_tokens if self.result is not None else 0

    def to_json(self) -> dict:
        if self.result is None:
            return {"id": self.id, "error": self.error}
        r = self.result
        return {"id": self.id, "text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "time_to_first_token_s": round(r.time_to_first_token, 4),
                "total_s": round(r.total_seconds, 4),
                **({"schema_valid": r.schema_valid} if r.schema_valid is not None else {}),
                **({"schema_error": r.schema_error} if r.schema_error else {})}


@dataclass
class BatchSummary:
    """What a batch did, all its requests together (`run --batch --stats`): filled in as it runs."""

    jobs: int = 0  # requests answered or failed
    failed: int = 0
    prompt_tokens: int = 0
    prompt_read: int = 0  # of them evaluated; the rest were given by a sequence that held them
    generated: int = 0
    seconds: float = 0.0  # from the first step to the last answer (loading and measuring not counted)
    first_tokens: list[float] = field(default_factory=list)  # each answer's time to first token, seconds
    steps: int = 0  # the model's llama_decode calls
    parallel: int = 0  # sequences at once
    how: str = ""  # where that number came from: --parallel, measured now or earlier, ...

    def add(self, result: BatchResult) -> None:
        self.jobs += 1
        if result.result is None:
            self.failed += 1
            return
        self.prompt_tokens += result.result.prompt_tokens
        self.prompt_read += result.prompt_read
        self.generated += result.result.completion_tokens
        self.first_tokens.append(result.result.time_to_first_token)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the batch's time, all sequences together."""
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    @property
    def median_first_token(self) -> float | None:
        return statistics.median(self.first_tokens) if self.first_tokens else None

    @property
    def p90_first_token(self) -> float | None:
        """The time to first token 90% of the answers got within (the nearest rank)."""
        ordered = sorted(self.first_tokens)
        return ordered[math.ceil(0.9 * len(ordered)) - 1] if ordered else None

    def to_json(self) -> dict:
        median, p90 = self.median_first_token, self.p90_first_token
        return {"jobs": self.jobs, "failed": self.failed, "prompt_tokens": self.prompt_tokens,
                "prompt_tokens_read": self.prompt_read, "generated_tokens": self.generated,
                "seconds": round(self.seconds, 3), "generation_tokens_per_second": round(self.tokens_per_second, 2),
                "median_time_to_first_token_s": None if median is None else round(median, 4),
                "p90_time_to_first_token_s": None if p90 is None else round(p90, 4),
                "steps": self.steps, "parallel": self.parallel, "parallel_from": self.how}


# --- reading requests -----------------------------------------------------------------


def read_items(handle: IO[bytes], what: str) -> list[BatchItem]:
    """The requests of a JSON Lines file, one a line (blank lines skipped); an id given twice is refused."""
    data = handle.read(FILE_LIMIT + 1)
    if len(data) > FILE_LIMIT:
        raise UsageError(f"{what} is larger than {FILE_LIMIT >> 20} MiB; split it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text (byte {exc.start})") from None
    items = [parse_line(line, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    _refuse_duplicates(items)
    return items


def parse_line(line: str, number: int) -> BatchItem:
    """One line as a request, or as an item carrying what is wrong with it."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return BatchItem(None, error=f"line {number}: not JSON ({exc.msg})", line=number)
    if not isinstance(data, dict):
        return BatchItem(None, error=f"line {number}: not a JSON object", line=number)
    key = data.get("id")
    if isinstance(key, bool) or not (isinstance(key, int) or is_text(key)):
        return BatchItem(None, error=f"line {number}: needs an \"id\", a string or a whole number", line=number)
    try:
        return replace(_item(key, data), line=number)
    except UsageError as exc:
        return BatchItem(key, error=f"line {number}: {exc}", line=number)


def _item(key: str | int, data: dict) -> BatchItem:
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise UsageError(f"unknown field {unknown[0]!r} (the fields: {', '.join(sorted(_FIELDS))})")
    if ("prompt" in data) == ("messages" in data):
        raise UsageError("give a \"prompt\" or \"messages\", one of them")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and (not _whole(max_tokens) or max_tokens < 1):
        raise UsageError("max_tokens must be a whole number, at least 1")
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(is_text(s) for s in stop)):
        raise UsageError("stop must be a string or a list of strings")
    return BatchItem(key, prompt=_text(data, "prompt"), messages=_messages(data.get("messages")),
                     system=_text(data, "system"), sampling=_sampling(data), max_tokens=max_tokens,
                     stop=None if stop is None else tuple(stop), constraint=_constraint(data))


def _text(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is not None and not is_text(value):
        raise UsageError(f"{name} must be a string (of UTF-8 text)")
    if name == "prompt" and value is not None and not value.strip():
        raise UsageError("empty prompt")
    return value


def _messages(value: object) -> tuple[Message, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise UsageError("messages must be a list of {\"role\", \"content\"} objects")
    for message in value:
        if not (isinstance(message, dict) and set(message) == {"role", "content"}
                and message["role"] in ("system", "user", "assistant") and is_text(message["content"])):
            raise UsageError("each message is {\"role\": \"system\", \"user\" or \"assistant\", \"content\": text}")
    if value[-1]["role"] != "user":
        raise UsageError("the last message must be the user's")
    return tuple(value)


def _sampling(data: dict) -> SamplingParams:
    chosen = {}
    for name, kind in _SAMPLING.items():
        value = data.get(name)
        if value is None:
            continue
        if not (_whole(value) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise UsageError(f"{name} must be a {'whole ' if kind is int else ''}number")
        if wrong := out_of_range(name, value):
            raise UsageError(f"{name} {wrong}")
        chosen[name] = value
    return SamplingParams(**chosen)


def _constraint(data: dict) -> Constraint | None:
    """A line's structured output: "format" ("json" or a schema, as Ollama's), "json_schema" or "grammar" (GBNF)."""
    from edgeinfer import grammar

    given = [name for name in _STRUCTURED if data.get(name) is not None]
    if len(given) > 1:
        raise UsageError(f"give one of format, json_schema and grammar, not {' and '.join(given)}")
    if not given:
        return None
    value = data[given[0]]
    if given[0] == "format":
        return grammar.from_format(value, "format") if isinstance(value, str) else grammar.from_schema(value, "format")
    if given[0] == "json_schema":
        return grammar.from_schema(value, "json_schema")
    if not is_text(value):
        raise UsageError("grammar must be GBNF text (a string)")
    return grammar.from_grammar(value, "grammar")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_duplicates(items: list[BatchItem]) -> None:
    seen: dict[str, int] = {}
    for item in items:
        if item.id is None:
            continue
        key = json.dumps(item.id)
        if key in seen:
            raise UsageError(f"the id {key} is given twice (lines {seen[key]} and {item.line}); ids must be unique")
        seen[key] = item.line


# --- writing answers -------------------------------------------------------------------


class ResultWriter:
    """Answers as JSON Lines, each written whole and flushed at once; counts the error lines."""

    def __init__(self, stream: IO[str], answered: set[str]) -> None:
        self.stream = stream
        self.answered = answered  # the ids (as JSON) an earlier run answered: skipped this time
        self.written = self.failed = self.invalid = 0

    def wants(self, item: BatchItem) -> bool:
        return item.id is None or json.dumps(item.id) not in self.answered

    def write(self, result: BatchResult) -> None:
        self.stream.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
        self.stream.flush()
        self.written += 1
        self.failed += result.error is not None
        self.invalid += result.result is not None and result.result.schema_valid is False


@contextmanager
def open_results(path: Path | None, stdout: IO[str]) -> Iterator[ResultWriter]:
    """A writer to `stdout`, or appending to `path`, which then tells which ids it answered already."""
    if path is None:
        yield ResultWriter(stdout, set())
        return
    answered = _answered(path)
    try:
        stream = path.open("a", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write --output {path}: {exc.strerror}") from None
    with stream:
        yield ResultWriter(stream, answered)


def _answered(path: Path) -> set[str]:
    """The ids a file of answers holds (an error line is no answer: its request is tried again). A last line
    without its newline (a crash mid-write) is cut off, so that the lines appended after it stay whole."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise UsageError(f"cannot read --output {path}: {exc.strerror}") from None
    whole = data[: data.rfind(b"\n") + 1]
    answered = set()
    for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            raise UsageError(f"--output {path} line {number} is not JSON: not a file of answers; "
                             "name a new file or one an earlier --batch run wrote") from None
        if isinstance(row, dict) and "id" in row and "error" not in row:
            answered.add(json.dumps(row["id"]))
    if len(whole) < len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(whole))
    return answered


# --- answering items ----------------------------------------------------------------------


def answer_items(model: Model, items: Iterable[BatchItem], request: BatchRequest, sampling: SamplingParams,
                 max_tokens: int | None, *, slots: int | None = None, stop: Callable[[], bool] | None = None,
                 on_done: Callable[[BatchResult], None] | None = None) -> Iterator[BatchResult]:
    """Each item's result as it completes (`on_done` hears of it first), `slots` sequences at once (None:
    as many as the context holds); an item that cannot become a job (a bad line, a template that fails, a
    prompt too long) is answered by its error. `sampling` and `max_tokens` are the request's, with the
    model's recommendations filled in."""
    from edgeinfer.batch import DEFAULT_STEP, AdmissionPolicy, generate_batch
    from edgeinfer.grammar import judged

    by_index: dict[int, BatchItem] = {}
    failed: list[BatchResult] = []
    grammars: dict[Constraint, Grammar] = {}  # each constraint compiled once for the model, whatever its lines

    def jobs() -> Iterator[Job]:
        for index, item in enumerate(items):
            try:
                job = _job(model, request, item, index, sampling, max_tokens, grammars)
            except EdgeinferError as exc:
                failed.append(BatchResult(item.id, index, error=str(exc)))
                continue
            by_index[index] = item
            yield job

    def results() -> Iterator[BatchResult]:
        places = slots or model.n_seq
        policy = AdmissionPolicy(places, model.n_cells,
                                 request.step_tokens or min(model.n_batch, max(DEFAULT_STEP, places)))
        for answer in generate_batch(model, jobs(), policy, stop=stop):
            yield from _drained(failed)
            item = by_index.pop(answer.key)
            error = answer.error and (f"line {item.line}: {answer.error}" if item.line else answer.error)
            result = answer.result and judged(answer.result, item.constraint or request.constraint)
            yield BatchResult(item.id, answer.key, result, error)
        yield from _drained(failed)

    for result in results():
        if on_done is not None:
            on_done(result)
        yield result


def answer_one_at_a_time(model: Model, items: Iterable[BatchItem], request: BatchRequest, sampling: SamplingParams,
                         max_tokens: int | None, stepper_factory: Callable, *, stop: Callable[[], bool] | None = None,
                         on_done: Callable[[BatchResult], None] | None = None) -> Iterator[BatchResult]:
    """answer_items' results one sequence at a time, each generated as `run` generates one answer (with
    `stepper_factory`: speculative decoding), in the items' order. Ctrl-C (`stop`, or one that ends a
    generation) raises Interrupted: the answer it cut short is dropped."""
    from edgeinfer.engine import generate
    from edgeinfer.grammar import judged

    grammars: dict[Constraint, Grammar] = {}
    for index, item in enumerate(items):
        if stop is not None and stop():
            raise Interrupted(INTERRUPTED)
        try:
            job = _job(model, request, item, index, sampling, max_tokens, grammars)
            answer = generate(model, job.prompt, job.sampling, max_tokens=job.max_tokens, stop=job.stop,
                              stepper_factory=stepper_factory, grammar=job.grammar)
            answer = judged(answer, item.constraint or request.constraint)
        except EdgeinferError as exc:
            error = str(exc) if str(exc).startswith("line ") or not item.line else f"line {item.line}: {exc}"
            result = BatchResult(item.id, index, error=error)
        else:
            if answer.finish_reason == "interrupted":
                raise Interrupted(INTERRUPTED)
            result = BatchResult(item.id, index, answer)
        if on_done is not None:
            on_done(result)
        yield result


def in_order(results: Iterable[BatchResult]) -> Iterator[BatchResult]:
    """Results in their items' order, each as soon as those before it are out; what is still held when the
    results end early (Ctrl-C) comes out then, in order: it is complete."""
    held: dict[int, BatchResult] = {}
    following = 0
    for result in results:
        held[result.index] = result
        while following in held:
            yield held.pop(following)
            following += 1
    yield from (held[index] for index in sorted(held))


def _job(model: Model, request: BatchRequest, item: BatchItem, index: int, sampling: SamplingParams,
         max_tokens: int | None, grammars: dict[Constraint, Grammar]) -> Job:
    """An item in tokens, with the batch's settings where it chose none."""
    from edgeinfer.batch import Job

    where = f"line {item.line}: " if item.line else ""
    if item.error is not None:
        raise UsageError(item.error)
    if (item.prompt is None) == (item.messages is None):
        raise UsageError(f"{where}give a prompt or messages, one of them")
    if request.raw and item.messages is not None:
        raise UsageError(f"{where}--raw takes prompts; messages need the chat template")
    if request.raw:
        tokens = raw_tokens(model, item.prompt)
    else:
        try:
            tokens = chat_tokens(model, _messages_of(request, item), parse_special=request.parse_special)
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"{where}{exc}") from None
    constraint = item.constraint or request.constraint
    if constraint is not None and constraint not in grammars:
        grammars[constraint] = constraint.compile(model)
    return Job(index, tuple(tokens), item.sampling.over(sampling),
               item.max_tokens if item.max_tokens is not None else max_tokens,
               item.stop if item.stop is not None else request.stop,
               grammar=grammars[constraint] if constraint is not None else None)


def _messages_of(request: BatchRequest, item: BatchItem) -> list[Message]:
    """An item's conversation: its messages or prompt, after its own system message, else the batch's
    (where its messages bring none)."""
    messages = list(item.messages or [{"role": "user", "content": item.prompt}])
    has_system = any(m["role"] == "system" for m in messages)
    system = item.system if item.system is not None else (None if has_system else request.system)
    return [{"role": "system", "content": system}, *messages] if system else messages


def _drained(results: list[BatchResult]) -> Iterator[BatchResult]:
    while results:
        yield results.pop(0)
