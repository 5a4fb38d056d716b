"""A loaded model and the token loop, on llama-cpp-python's low-level API."""

# `Model` owns one llama.cpp model and context and knows which tokens its KV cache
# holds, so a new prompt that shares a prefix with the last one (the next chat
# turn) only evaluates the new tokens. `generate` answers one prompt: plain decoding
# through the batch engine (batch.py, one sequence), speculative decoding through the
# loop here, which asks a `Stepper` for the next tokens (several at a time), and
# streams their text.

from __future__ import annotations

import copy
import ctypes
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgeinfer import machine, threads
from edgeinfer.bindings import c_api  # (llama.cpp's C API without llama-cpp-python's high-level half)
from edgeinfer.errors import GenerationError, InvalidModelError, UsageError
from edgeinfer.ggufinfo import GGUFInfo, inspect
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.textstream import TextStream

if TYPE_CHECKING:
    from edgeinfer.grammar import Grammar

DEFAULT_CTX = 4096
AUTO_CACHE = "auto"
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass(frozen=True)
class LoadOptions:
    n_ctx: int | None = None  # None: the model's training context, at most DEFAULT_CTX
    n_threads: int | None = None  # None: chosen from the free cores, and adapted while generating (threads.py)
    n_gpu_layers: int | None = None  # None: all layers on a GPU build, 0 on a CPU build
    n_batch: int = 512
    verbose: bool = False
    # Let llama.cpp repack weights for its CPU kernels (Q4_0, Q4_K, IQ4_NL on AVX2, AVX-512, ARM): faster,
    # but a batch of tokens and one token then go through kernels that round differently.
    repack: bool = True
    # --cache-type: the KV cache's type (llama.cpp's -ctk/-ctv). On the CPU, a q8_0 or bf16 cache keeps
    # speculation's passes exact past 256 tokens of context, where an f16 one does not (speculative.LONG_CONTEXT).
    # "auto": f16 (llama.cpp's default) for plain decoding, q8_0 or bf16 for speculation on the CPU (decided).
    cache_type: str = AUTO_CACHE
    # Sequences one context holds at once (run --batch --parallel), each with n_ctx tokens of its own: the KV
    # cache gets n_seq x n_ctx cells unless `n_cells` names fewer, and the memory check counts them all.
    n_seq: int = 1
    n_cells: int | None = None

    def __post_init__(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 16:
            raise UsageError("--ctx-size must be at least 16")
        if not 1 <= self.n_seq <= MAX_SEQUENCES:
            raise UsageError(f"--parallel must be between 1 and {MAX_SEQUENCES}")
        if self.n_cells is not None and self.n_cells < 16:
            raise UsageError("a context needs at least 16 KV cells")
        machine.check_threads(self.n_threads)
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise UsageError("--gpu-layers must be -1 (all), 0 or more")
        if self.cache_type != AUTO_CACHE and self.cache_type not in machine.KV_CACHE_TYPES:
            raise UsageError(f"--cache-type must be {AUTO_CACHE} or one of {', '.join(machine.KV_CACHE_TYPES)}")

    def decided(self, speculation_cache: str | None = None) -> "LoadOptions":
        """These options with an "auto" cache type decided: `speculation_cache` where a run verifies drafts on
        the CPU (q8_0 or bf16, whichever this machine measured faster: its passes stay exact past 256 tokens of
        context, 1.5-1.7x on code edits where f16 gives none), else f16, so that plain answers stay llama.cpp's
        own. A type the user named is kept."""
        if self.cache_type != AUTO_CACHE:
            return self
        return replace(self, cache_type=speculation_cache if speculation_cache and self.on_cpu else "f16")

    @property
    def on_cpu(self) -> bool:
        return self.n_gpu_layers == 0 or not gpu_offload()

    @property
    def kv_type(self) -> str:
        """The concrete cache type ("auto" undecided means plain decoding's f16)."""
        return "f16" if self.cache_type == AUTO_CACHE else self.cache_type

    @property
    def threads(self) -> int:
        """The most threads llama.cpp will use: as given, else the usable cores."""
        return self.n_threads or machine.usable_cores()


def check_context(info: GGUFInfo, n_ctx: int, cache_type: str = "f16", n_seq: int = 1,
                  n_cells: int | None = None) -> str | None:
    """Refuse a context whose KV cache would not fit in memory (n_ctx for each of n_seq sequences, or
    n_cells in all); for one past the context the model was trained on, a note: answers there tend to fall
    apart, and llama.cpp says so only in its log, which edgeinfer keeps quiet, while a user may still want
    it (RoPE scaling)."""
    machine.check_fits(info, n_ctx, cache_type, n_seq, n_cells)
    trained = info.context_length
    if not trained or n_ctx <= trained:
        return None
    return (f"--ctx-size {n_ctx} is past the {trained} tokens {info.path.name} was trained on: "
            "text beyond that may come out garbled")


def load(path: Path, options: LoadOptions = LoadOptions(), cache_file: Path | None = None) -> "Model":
    """Validate a GGUF with the gguf reader, check the context fits in memory, then hand it to llama.cpp."""
    info = inspect(path, cache_file)
    n_ctx = context_size(info, options)
    # (its note is the caller's to show: the CLI shows it before loading)
    check_context(info, n_ctx, options.kv_type, options.n_seq, options.n_cells)
    return Model(path, info, options, n_ctx)


def context_size(info: GGUFInfo, options: LoadOptions) -> int:
    """The tokens one sequence may hold: --ctx-size, else the model's training context, at most DEFAULT_CTX."""
    return options.n_ctx or min(info.context_length or DEFAULT_CTX, DEFAULT_CTX)


class Model:
    def __init__(self, path: Path, info: GGUFInfo, options: LoadOptions, n_ctx: int) -> None:
        init_backend(options.verbose)
        llama_cpp = c_api()

        self._ll = llama_cpp
        self.path, self.info, self.n_ctx = path, info, n_ctx
        self.n_seq = options.n_seq
        self.n_cells = options.n_cells or n_ctx * options.n_seq  # the KV cache's cells, all sequences together
        # (a step of several sequences may hold more tokens than one sequence's context)
        self.n_batch = min(options.n_batch, self.n_cells)
        self.n_threads = options.threads  # the most it uses: the cost book's key
        self.n_gpu_layers = options.n_gpu_layers
        self.cache_type = options.kv_type
        self._model = self._load_model(path, options)
        # --threads is obeyed as given; the default starts from the cores other programs left free during
        # the load, and follows their load from there.
        self.tuner: threads.ThreadTuner | None = threads.start(self.n_threads, machine.others_busy(),
                                                               fixed=options.n_threads is not None)
        self._load_mark = machine.cpu_sample()
        self._owns_model = True
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}
        self._open_context()

    def _open_context(self) -> None:
        ll = self._ll
        self._ctx = self._new_context()
        self.n_cells = ll.llama_n_ctx(self._ctx)  # (what llama.cpp made of it: it pads to a multiple of 256)
        self._memory = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.cached: list[int] = []  # the tokens whose keys and values sit in the KV cache, in order

    def scratch(self, n_ctx: int) -> "Model":
        """A second, small context on the same weights, for measurements that must leave this context's
        KV cache (a prompt already read) alone. Closing it frees its context only."""
        other = copy.copy(self)
        other.n_ctx, other.n_batch, other._owns_model = n_ctx, min(self.n_batch, n_ctx), False
        other.n_seq, other.n_cells = 1, n_ctx
        other.tuner = None  # (measurements there must not move this context's threads)
        other._open_context()
        return other

    def _load_model(self, path: Path, options: LoadOptions):
        ll = self._ll
        params = ll.llama_model_default_params()
        gpu = options.n_gpu_layers
        params.n_gpu_layers = (-1 if ll.llama_supports_gpu_offload() else 0) if gpu is None else gpu
        params.use_extra_bufts = options.repack
        return load_model_file(path, params)

    def _new_context(self):
        ll = self._ll
        params = ll.llama_context_default_params()
        params.n_ctx = self.n_cells
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq
        # One cache for all sequences: a prefix one sequence holds can be given to another
        # (llama_memory_seq_cp) without copying a value; per-sequence caches would copy whole streams.
        params.kv_unified = self.n_seq > 1
        params.n_threads = params.n_threads_batch = self.threads_now
        params.type_k = params.type_v = machine.KV_CACHE_TYPES[self.cache_type][0]
        params.no_perf = True
        ctx = ll.llama_init_from_model(self._model, params)
        if not ctx:
            raise GenerationError(f"llama.cpp could not create a {self.n_cells}-token context (out of memory?)")
        return ctx

    # --- tokens and text -----------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (self._ll.llama_token * capacity)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            buf = (self._ll.llama_token * -n)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (possibly part of a UTF-8 character)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    def token_text(self, token: int) -> str:
        """A token's text with special tokens spelled out (for templates' bos_token/eos_token)."""
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    @property
    def bos_token(self) -> int:
        return int(self._ll.llama_vocab_bos(self._vocab))

    @property
    def eos_token(self) -> int:
        return int(self._ll.llama_vocab_eos(self._vocab))

    # --- the KV cache ------------------------------------------------------------

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate a prompt, reusing the cached prefix it shares; returns the last position's logits."""
        if not tokens:
            raise GenerationError("empty prompt: nothing to evaluate")
        if len(tokens) >= self.n_ctx:
            raise GenerationError(f"the prompt is {len(tokens)} tokens, the context holds {self.n_ctx}; shorten it or raise --ctx-size")
        keep = common_prefix(self.cached, tokens)
        keep = min(keep, len(tokens) - 1)  # the last token is always evaluated again: we need its logits
        self.truncate(keep)
        rest = list(tokens[keep:])
        for start in range(0, len(rest), self.n_batch):
            chunk = rest[start : start + self.n_batch]
            logits = self.decode(chunk, all_logits=False)
        return logits[-1].copy()

    def decode(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the cache; returns logits (one row, or one per token with all_logits).

        The rows are a view of llama.cpp's buffer, valid until the next decode.
        """
        n = len(tokens)
        if n == 0 or n > self.n_batch:
            raise GenerationError(f"cannot evaluate {n} tokens at once (batch holds {self.n_batch})")
        if len(self.cached) + n > self.n_ctx:
            raise GenerationError(f"the context window ({self.n_ctx} tokens) is full")
        batch, pos0 = self._batch, len(self.cached)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == n - 1
        batch.n_tokens = n
        start = time.perf_counter()
        code = self._ll.llama_decode(self._ctx, batch)
        if self.tuner is not None and code == 0:
            self._retune(n, time.perf_counter() - start)
        if code != 0:
            raise GenerationError(f"llama.cpp could not evaluate the batch (llama_decode returned {code})")
        self.cached.extend(tokens)
        rows = n if all_logits else 1
        first = 0 if all_logits else n - 1
        ptr = self._ll.llama_get_logits_ith(self._ctx, first)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab))

    @property
    def contended(self) -> bool:
        """Did other programs share the CPU while this model loaded or decoded?"""
        return self.tuner is not None and self.tuner.contended

    @property
    def threads_now(self) -> int:
        return self.tuner.now if self.tuner is not None else self.n_threads

    def _retune(self, size: int, seconds: float) -> None:
        """Follow other programs' load: a look at /proc/stat every ThreadTuner.LOOK seconds."""
        self.tuner.observe(size, seconds)
        if time.monotonic() - self._load_mark.wall < self.tuner.LOOK:
            return  # (the clock only: /proc/stat is read once a look, not once a token)
        now = machine.cpu_sample()
        before = self.tuner.now
        if self.tuner.observe_load(now.others_since(self._load_mark)) != before:
            self._ll.llama_set_n_threads(self._ctx, self.tuner.now, self.tuner.now)
        self._load_mark = now

    def truncate(self, n: int) -> None:
        """Forget every cached position from `n` on.

        Asked of llama.cpp even when `cached` holds no more than n tokens: the cache
        is the truth, and a decode whose bookkeeping was cut short must not leave a
        stray position behind.
        """
        self._ll.llama_memory_seq_rm(self._memory, 0, n, -1)
        del self.cached[n:]

    # --- several sequences (batch.py's step) --------------------------------------------
    # Only forget(-1) touches `cached`, the record of sequence 0; a Batcher begins from that record and
    # leaves its own sequence 0 there when it closes (batch.py, kept prefixes).

    def decode_rows(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int],
                    outputs: Sequence[bool]) -> bool:
        """Evaluate one batch, each token at its position in its sequence, with logits where `outputs` says;
        False where llama.cpp found no free KV cells for it (the cache is then as it was)."""
        n = len(tokens)
        if n == 0 or n > self.n_batch:
            raise GenerationError(f"cannot evaluate {n} tokens at once (batch holds {self.n_batch})")
        batch = self._batch
        for i in range(n):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tokens[i], positions[i], 1
            batch.seq_id[i][0], batch.logits[i] = seq_ids[i], outputs[i]
        batch.n_tokens = n
        start = time.perf_counter()
        code = self._ll.llama_decode(self._ctx, batch)
        if code == 1:
            return False
        if code != 0:
            raise GenerationError(f"llama.cpp could not evaluate the batch (llama_decode returned {code})")
        if self.tuner is not None:
            self._retune(n, time.perf_counter() - start)
        return True

    def row(self, i: int) -> np.ndarray:
        """The logits of the i-th token of the last decode_rows: a view, valid until the next decode."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))

    def rows(self, i: int, count: int) -> np.ndarray:
        """The logits of `count` tokens of the last decode_rows from the i-th on, each of them an output."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, i), shape=(count, self.n_vocab))

    @property
    def shares_cache(self) -> bool:
        """Do several sequences share the KV cache? Then a pass attends over cells other sequences hold as well
        (its kernel chosen by their count: speculative passes are checked as past LONG_CONTEXT)."""
        return self.n_seq > 1

    def forget(self, seq_id: int, start: int = 0) -> None:
        """Free a sequence's cells from position `start` on; seq_id -1: every sequence's."""
        self._ll.llama_memory_seq_rm(self._memory, seq_id, start, -1)
        if seq_id == -1:
            del self.cached[start:]

    def held(self, seq_id: int) -> int:
        """The positions the cache holds for a sequence, as llama.cpp counts them (0: none)."""
        return self._ll.llama_memory_seq_pos_max(self._memory, seq_id) + 1

    def share(self, source: int, dest: int, n: int) -> None:
        """Give sequence `dest` the first n positions `source` holds: in a unified cache, the same cells
        tagged with both sequences, not a copy of their values."""
        self._ll.llama_memory_seq_cp(self._memory, source, dest, 0, n)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self._ctx)
            if self._owns_model:
                self._ll.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def common_prefix(a: Sequence[int], b: Sequence[int], most: int | None = None) -> int:
    """How many tokens a and b begin with alike (at most `most`)."""
    n = min(len(a), len(b)) if most is None else min(len(a), len(b), most)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# --- the token loop ---------------------------------------------------------------


class Stepper(Protocol):
    def prepare(self, prompt: Sequence[int]) -> None:
        """Read the prompt beside the model (a draft model's own prefill), before the first token.

        Reading the prompt is prompt processing whoever does it: counted in the time to
        first token, as llama.cpp's speculative example counts it, not in generation.
        """

    def advance(self, history: list[int]) -> list[int]:
        """Evaluate history[-1] (sampled, not yet in the cache) and return the next token(s)."""

    def finish(self) -> None:
        """The answer is over (what it cost may be worth remembering)."""


class PlainStepper:
    """One token per model call: the baseline every other stepper must equal."""

    def __init__(self, model: Model, sampler: Sampler) -> None:
        self.model, self.sampler = model, sampler

    def prepare(self, prompt: Sequence[int]) -> None:
        pass  # the model itself has read the prompt

    def advance(self, history: list[int]) -> list[int]:
        logits = self.model.decode(history[-1:])[0]
        return [self.sampler.sample(logits, history)]

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (end of generation or stop string), "length", "context", "interrupted"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float
    total_seconds: float
    tokens: tuple[int, ...] = ()
    stats: dict = field(default_factory=dict)  # extra figures from the stepper (speculative decoding)
    threads: dict = field(default_factory=dict)  # what other programs' load did to the run (threads.ThreadTuner)
    cache_type: str = "f16"  # the KV cache's type the answer was computed with
    cached_tokens: int = 0  # prompt tokens the cache already held (a conversation's earlier turns): not read again
    # Structured output (--format json, --json-schema): did the finished answer parse and validate, and if not why.
    schema_valid: bool | None = None
    schema_error: str | None = None

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.time_to_first_token if self.time_to_first_token > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        seconds = self.total_seconds - self.time_to_first_token
        return (self.completion_tokens - 1) / seconds if self.completion_tokens > 1 and seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "time_to_first_token_s": round(self.time_to_first_token, 4),
            "prompt_tokens_per_second": round(self.prompt_tokens_per_second, 2),
            "generation_tokens_per_second": round(self.generation_tokens_per_second, 2),
            "total_s": round(self.total_seconds, 4),
            **({"speculative": self.stats} if self.stats else {}),
            **({"threads": self.threads} if self.threads else {}),
            "cache_type": self.cache_type,
            **({"schema_valid": self.schema_valid} if self.schema_valid is not None else {}),
            **({"schema_error": self.schema_error} if self.schema_error else {}),
        }


def generate(
    model: Model,
    prompt: Sequence[int],
    sampling: SamplingParams = SamplingParams(),
    *,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    stepper_factory: Callable[[Model, Sampler], Stepper] | None = None,
    grammar: Grammar | None = None,
) -> GenerationResult:
    """Generate from a prompt until end of generation, a stop string, max_tokens or a full context.

    Ctrl-C ends generation cleanly after the step under way (finish_reason "interrupted");
    the text so far is kept. Plain decoding goes through the batch engine (a batch of one sequence);
    a stepper (speculative decoding) through the loop below. A `grammar` (structured output) constrains
    every token and ends the answer.
    """
    if stepper_factory is None:
        from edgeinfer.batch import generate_one  # (batch.py builds on this module: imported at the call)

        return generate_one(model, prompt, sampling, max_tokens=max_tokens, stop=stop, on_text=on_text,
                            grammar=grammar)
    start = time.perf_counter()
    emit = on_text or (lambda _text: None)
    sampler = Sampler(sampling, grammar)
    stepper = stepper_factory(model, sampler)
    history, produced = list(prompt), []
    stream, reason, first = TextStream(stop), None, 0.0
    limit = max_tokens if max_tokens is not None else model.n_ctx
    cached = common_prefix(model.cached, prompt, len(prompt) - 1)
    with ctrl_c_sets_flag() as interrupted:
        try:
            logits = model.prefill(prompt)
            stepper.prepare(prompt)
            pending = [sampler.sample(logits, history)]
            first = time.perf_counter() - start
            while reason is None:
                reason = _consume(model, pending, history, produced, stream, emit, limit)
                if reason is None and interrupted.is_set():
                    reason = "interrupted"
                elif reason is None and len(model.cached) + 1 > model.n_ctx:
                    reason = "context"
                elif reason is None:
                    pending = stepper.advance(history)
        finally:
            stepper.finish()
    emit(stream.flush())
    stats = getattr(stepper, "stats", None)
    return GenerationResult(
        text=stream.text,
        finish_reason=reason,
        prompt_tokens=len(prompt),
        completion_tokens=len(produced),
        time_to_first_token=first or (time.perf_counter() - start),
        total_seconds=time.perf_counter() - start,
        tokens=tuple(produced),
        stats=stats() if callable(stats) else {},
        threads=model.tuner.summary() if model.tuner is not None else {},
        cache_type=model.cache_type,
        cached_tokens=max(cached, 0),
    )


@contextmanager
def ctrl_c_sets_flag() -> Iterator[threading.Event]:
    """Ctrl-C during generation ends it between two steps, never inside one.

    A KeyboardInterrupt raised in the middle of a decode could leave the KV cache
    and our record of it disagreeing; a flag checked by the loop cannot.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _consume(model: Model, tokens: list[int], history: list[int], produced: list[int],
             stream: TextStream, emit: Callable[[str], None], limit: int) -> str | None:
    """Take the stepper's tokens one by one; a reason to finish ends the block early."""
    for token in tokens:
        if model.is_eog(token):
            return "stop"
        history.append(token)
        produced.append(token)
        text = stream.push(model.piece(token))
        if text:
            emit(text)
        if stream.stopped:
            return "stop"
        if len(produced) >= limit:
            return "length"
    return None


# --- llama.cpp's process-wide state -------------------------------------------------

_backend = {"ready": False, "callback": None, "errors": []}
_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR


def init_backend(verbose: bool) -> None:
    """Initialise llama.cpp once; route its log to stderr only when asked (--verbose), keeping its errors."""
    import os

    llama_cpp = c_api()

    # Should llama.cpp abort (a bug, or a file no check foresaw), one line on stderr, not a debugger's
    # backtrace on stdout, where it would take the place of an answer or of --json.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    if not _backend["ready"]:
        llama_cpp.llama_backend_init()
        _backend["ready"] = True

    @llama_cpp.llama_log_callback
    def _log(level, text, _user):
        message = text.decode("utf-8", errors="replace")
        if level == _LOG_ERROR:
            _backend["errors"].append(message.strip())
        if verbose:
            import sys

            sys.stderr.write(message)

    _backend["callback"] = _log  # keep a reference: llama.cpp holds only the C pointer
    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))


def gpu_offload() -> bool:
    """Can this build of llama.cpp offload layers to a GPU (CUDA, Metal, Vulkan...)?"""
    llama_cpp = c_api()

    return bool(llama_cpp.llama_supports_gpu_offload())


def load_model_file(path: Path, params) -> object:
    """llama.cpp's model from a checked GGUF, or an InvalidModelError that says why llama.cpp refused it
    (the first error it logged, e.g. a tensor it found missing), though its log is not shown."""
    llama_cpp = c_api()

    _backend["errors"] = []
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        why = next(iter(_backend["errors"]), "unsupported architecture or tensor layout?")
        raise InvalidModelError(f"llama.cpp could not load {path.name}: {why.split('error loading model: ')[-1]}")
    return model


def vocabulary(path: Path) -> list[bytes] | None:
    """The text of each token of a GGUF's vocabulary, as llama.cpp reads it (vocab_only: no tensor is
    read); None where llama.cpp cannot read it."""
    llama_cpp = c_api()

    init_backend(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return [llama_cpp.llama_vocab_get_text(vocab, i) for i in range(llama_cpp.llama_vocab_n_tokens(vocab))]
    finally:
        llama_cpp.llama_model_free(model)
