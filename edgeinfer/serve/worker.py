"""The engine thread: one Batcher on the loaded model, driven by one thread, fed by the HTTP handlers."""

# llama.cpp is called from this thread alone (loading, templates and tokenizing included), so nothing of
# it needs a lock. Handlers on the asyncio loop put commands on a thread-safe queue; the thread takes them
# between two steps, and sends each request's events back to its handler with loop.call_soon_threadsafe:
# `Started` (its prompt in tokens) or an error first, then text as it comes, then the `Answer`. A handler
# whose client went away asks `cancel`, and the next step frees the sequence's cells. How many requests
# may be outstanding at once is bounded (the sequences plus --queue); beyond that `submit` refuses at once.

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeinfer.errors import EdgeinferError
from edgeinfer.serve.ask import ApiError, Ask

if TYPE_CHECKING:
    from edgeinfer.api import Prepared
    from edgeinfer.batch import Answer, Batcher
    from edgeinfer.engine import Model


@dataclass(frozen=True)
class Started:
    """A request became a sequence: its prompt is this many tokens."""

    prompt_tokens: int


@dataclass(frozen=True)
class Gauges:
    """What the engine holds now (for /metrics): sequences generating or reading, waiting, KV cells."""

    active: int = 0
    waiting: int = 0
    cells: int = 0  # positions llama.cpp's cache holds, summed over the sequences (a shared prefix counts twice)
    kept: int = 0  # positions kept from finished answers, a prefix for whoever comes next (batch.Batcher.kept)


class Reply:
    """One request's events, from the engine thread to its handler on the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._events = loop, asyncio.Queue()

    def put(self, event: object) -> None:  # (engine thread)
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    async def get(self) -> object:
        return await self._events.get()


class Engine:
    """The loaded model behind the server: `start` loads it in the engine thread, `submit` queues requests."""

    def __init__(self, prepared: Prepared, queue_size: int, *, on_ready: Callable[[Model], None] | None = None,
                 on_failure: Callable[[EdgeinferError], None] | None = None) -> None:
        self.prepared, self.on_ready, self.on_failure = prepared, on_ready, on_failure
        self.limit = prepared.load.n_seq + queue_size  # requests outstanding at once, beyond which submit refuses
        self.model: Model | None = None
        self.failure: EdgeinferError | None = None
        self.gauges = Gauges()
        self.finished: Callable[[Answer], None] | None = None  # told of every answer (the metrics)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding = 0
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeinfer-engine", daemon=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.failure is None

    def start(self) -> None:
        self._thread.start()

    def submit(self, ask: Ask, reply: Reply) -> int:
        """Queue a request; its key (for `cancel`). A 503 with Retry-After while loading or when full."""
        if self.failure is not None:
            raise ApiError(503, f"the model cannot answer: {self.failure}", code="engine_failed")
        if not self.ready:
            raise ApiError(503, "the model is still loading", code="loading", retry_after=1)
        with self._lock:
            if self._outstanding >= self.limit:
                raise ApiError(503, f"the server is busy: {self.limit} requests are in hand (--parallel plus "
                               "--queue); try again shortly", code="queue_full", retry_after=1)
            self._outstanding += 1
        key = next(self._keys)
        self._commands.put(("ask", key, ask, reply))
        return key

    def cancel(self, key: int) -> None:
        """End a request at the next step (its client went away)."""
        self._commands.put(("cancel", key))

    def cancel_all(self) -> None:
        """End every request at the next step (the grace after SIGTERM is over)."""
        self._commands.put(("cancel_all",))

    def stop(self, timeout: float | None = None) -> None:
        """Cancel whatever is under way, free the context and the model, and end the thread."""
        self._commands.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------

    def _run(self) -> None:
        from edgeinfer.batch import Batcher
        from edgeinfer.engine import load
        from edgeinfer.speculative import speculation

        prepared, loaded = self.prepared, contextlib.ExitStack()
        try:
            model = loaded.enter_context(load(prepared.path, prepared.load, prepared.cache_file))
            # (--draft: the draft model loads beside it; the costs measured are saved when the server stops)
            factory = loaded.enter_context(speculation(model, prepared.plan, prepared.load, prepared.max_tokens,
                                                       prepared.cache_file))
        except EdgeinferError as exc:
            loaded.close()
            self.failure = exc
            self._ready.set()
            if self.on_failure is not None:
                self.on_failure(exc)
            return
        with loaded:
            # A request that generates alone takes speculative rounds; beside others, plain batched steps.
            solo = factory if prepared.plan.verifying else None
            self.model, batcher, replies = model, Batcher(model, solo=solo), {}
            self._ready.set()
            if self.on_ready is not None:
                self.on_ready(model)
            try:
                while self._take(batcher, replies):
                    for answer in batcher.step() if batcher.busy else ():
                        self._finish(answer, replies)
                    self._measure(batcher)
            except Exception as exc:  # a bug (or llama.cpp failing a decode): every request in hand hears of it
                self.failure = exc if isinstance(exc, EdgeinferError) else EdgeinferError(f"the engine failed: {exc!r}")
                for reply in replies.values():
                    reply.put(ApiError(500, str(self.failure)))
                raise
            finally:
                for answer in self._drop(batcher):
                    self._finish(answer, replies)
                self.model = None

    def _take(self, batcher: Batcher, replies: dict[int, Reply]) -> bool:
        """Carry out the commands waiting (waiting for one while there is no work); False on stop."""
        block = not batcher.busy
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command[0] == "stop":
                return False
            if command[0] == "cancel":
                batcher.cancel(command[1])
            elif command[0] == "cancel_all":
                batcher.cancel_all()
            else:
                self._queue(batcher, replies, *command[1:])
                self._measure(batcher)

    def _queue(self, batcher: Batcher, replies: dict[int, Reply], key: int, ask: Ask, reply: Reply) -> None:
        """An ask in tokens, queued in the batcher; an error (a template that fails, a prompt longer than
        the context) goes back to its handler instead."""
        try:
            job = self._job(key, ask, reply)
            batcher.submit(job)
        except EdgeinferError as exc:
            self._done()
            reply.put(ApiError(400, str(exc)))
            return
        replies[key] = reply
        reply.put(Started(len(job.prompt)))

    def _job(self, key: int, ask: Ask, reply: Reply):
        from edgeinfer.batch import Job
        from edgeinfer.template import chat_tokens, raw_tokens

        model, prepared = self.model, self.prepared
        tokens = raw_tokens(model, ask.prompt) if ask.messages is None else chat_tokens(model, list(ask.messages))
        max_tokens = ask.max_tokens if ask.max_tokens is not None else prepared.max_tokens
        grammar = ask.constraint.compile(model) if ask.constraint is not None else None
        return Job(key, tuple(tokens), ask.sampling.over(prepared.sampling), max_tokens, ask.stop, on_text=reply.put,
                   grammar=grammar)

    def _finish(self, answer: Answer, replies: dict[int, Reply]) -> None:
        self._done()
        reply = replies.pop(answer.key, None)
        if self.finished is not None:
            self.finished(answer)
        if reply is not None:
            reply.put(_outcome(answer))

    def _drop(self, batcher: Batcher) -> list[Answer]:
        """At stop: every sequence still there ends as cancelled, its cells freed."""
        batcher.cancel_all()
        answers = batcher.step() if batcher.busy else []
        batcher.close()
        self.gauges = Gauges()
        return answers

    def _done(self) -> None:
        with self._lock:
            self._outstanding -= 1

    def _measure(self, batcher: Batcher) -> None:
        self.gauges = Gauges(len(batcher.live), len(batcher.waiting), batcher.cells_used, batcher.cells_kept)



def _outcome(answer: Answer) -> Answer | ApiError:
    """What the handler hears: the answer, or the error it is for the client (a sequence that failed; one
    the server cancelled when its grace after SIGTERM was over: a client that went away hears nothing)."""
    if answer.error is not None:
        return ApiError(400, answer.error)
    if answer.result.finish_reason == "cancelled":
        return ApiError(503, "the server stopped before the answer was complete", code="shutting_down")
    return answer
