"""The HTTP application: routes for both protocols over one Engine, the API key, the body limit, errors in
each protocol's shape, one log line and the counts of every request."""

# A generation request goes: body read (at most BODY_LIMIT, refused by its Content-Length before it is read),
# checked into an Ask by its protocol's module, submitted to the engine (refused at once when the queue is
# full), and its first event awaited, so that an error in it (a prompt longer than the context) is still a
# status code; then the answer is written whole or streamed. A client that goes away is noticed by Starlette
# (streams) or by our own watch on the connection (whole answers), and its sequence is cancelled.

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeinfer import __version__
from edgeinfer.serve import ollama, openai
from edgeinfer.serve.ask import ApiError, Ask, Timing, bad
from edgeinfer.serve.metrics import Metrics
from edgeinfer.serve.worker import Engine, Reply, Started

BODY_LIMIT = 16 << 20  # more than any context holds as text: a larger body is a mistake or an attack
CLIENT_GONE = 499  # (nginx's code in the log for a client that closed its connection before the answer)


@dataclass(frozen=True)
class Site:
    """What the application serves: the engine, the names its model answers to, who may ask."""

    engine: Engine
    names: list[str]  # the model's name, then its aliases
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    log: Callable[[str], None] = lambda line: None


def build(site: Site) -> Starlette:
    handlers = _Handlers(site)
    routes = [Route("/", handlers.root), Route("/health", handlers.health), Route("/metrics", handlers.metrics),
              Route("/v1/models", handlers.models),
              Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
              Route("/v1/completions", handlers.completions, methods=["POST"]),
              Route("/api/tags", handlers.tags), Route("/api/version", handlers.version),
              Route("/api/chat", handlers.ollama_chat, methods=["POST"]),
              Route("/api/generate", handlers.ollama_generate, methods=["POST"])]
    middleware = [Middleware(_Gate, site=site, metrics=handlers.counts, paths={r.path for r in routes})]
    if site.cors:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(site.cors), allow_methods=["*"],
                                        allow_headers=["*"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _bug})


# --- errors, in the shape of the protocol the path belongs to ------------------------------


def _error_response(path: str, error: ApiError) -> JSONResponse:
    body = ollama.error_body(error) if path.startswith("/api/") else openai.error_body(error)
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return JSONResponse(body, error.status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    return _error_response(request.url.path, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    message = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed here"}
    return _error_response(request.url.path, ApiError(exc.status_code, message.get(exc.status_code, exc.detail)))


async def _bug(request: Request, exc: Exception) -> Response:
    return _error_response(request.url.path, ApiError(500, f"internal error ({type(exc).__name__}); "
                                                           "the server log has the details"))


class _Gate:
    """Around every request: the API key (all paths but /health), then one log line and the counts."""

    def __init__(self, app, site: Site, metrics: Metrics, paths: set[str]) -> None:
        self.app, self.site, self.metrics, self.paths = app, site, metrics, paths
        self.key = f"Bearer {site.api_key}".encode() if site.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope["path"]
        try:
            if self.key is not None and path != "/health" and not self._authorized(scope):
                response = _error_response(path, ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                                          code="invalid_api_key"))
                await response(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            self._record(scope, path, status[0] or CLIENT_GONE, time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.key)

    def _record(self, scope, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in self.paths else "other"  # (a label per unknown path would grow without bound)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        state = scope.get("state") or {}
        what = f" {state['tokens']}" if "tokens" in state else ""
        self.site.log(f"{scope['method']} {path} {status}{what} {seconds:.2f}s")


# --- the handlers -------------------------------------------------------------------------


class _Handlers:
    def __init__(self, site: Site) -> None:
        self.site, self.engine = site, site.engine
        self.counts = Metrics(lambda: self.engine.gauges, lambda: self.engine.model.n_cells if self.engine.model else 0)
        self.engine.finished = self._finished
        # The model file does not change while it is served: its size and time are read once, not per listing.
        stat = self.engine.prepared.path.stat()
        self._size, self._modified = stat.st_size, stat.st_mtime
        self._details: dict | None = None  # (its metadata, read at the first /api/tags)

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("edgeinfer is running")

    async def health(self, request: Request) -> Response:
        if self.engine.ready:
            return JSONResponse({"status": "ok"})
        state = "error" if self.engine.failure is not None else "loading"
        return JSONResponse({"status": state}, 503, headers={"Retry-After": "1"})

    async def metrics(self, request: Request) -> Response:
        return Response(self.counts.text(), media_type=self.counts.content_type)

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai.models(self.site.names, int(self._modified)))

    async def tags(self, request: Request) -> Response:
        return JSONResponse(ollama.tags(self.site.names, self._size, self._modified, self._model_details()))

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": ollama.VERSION, "edgeinfer": __version__})

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, openai.chat_ask, openai.ChatFormat)

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, openai.completion_ask, openai.CompletionFormat)

    async def ollama_chat(self, request: Request) -> Response:
        return await self._ollama(request, ollama.chat_ask, ollama.ChatFormat)

    async def ollama_generate(self, request: Request) -> Response:
        return await self._ollama(request, ollama.generate_ask, ollama.GenerateFormat)

    async def _openai(self, request: Request, read, answer_format) -> Response:
        body = await _read_json(request)
        name = self._model(body, openai_names=True)
        ask, usage = read(body)
        return await self._answer(request, ask, answer_format(name, usage))

    async def _ollama(self, request: Request, read, answer_format) -> Response:
        """An Ollama request; one without a prompt only asks for the model to be loaded (it is)."""
        body = await _read_json(request)
        fmt = answer_format(self._model(body))
        ask = read(body, self._n_ctx())
        return JSONResponse(fmt.loaded()) if ask is None else await self._answer(request, ask, fmt)

    # --- answering -------------------------------------------------------------------

    async def _answer(self, request: Request, ask: Ask, fmt) -> Response:
        timing, reply = Timing(), Reply(asyncio.get_running_loop())
        key = self.engine.submit(ask, reply)
        try:
            first = await reply.get()
        except asyncio.CancelledError:
            self.engine.cancel(key)
            raise
        if isinstance(first, ApiError):
            raise first
        assert isinstance(first, Started)
        if ask.stream:
            return _Stream(self._events(request, reply, fmt, timing), lambda: self.engine.cancel(key),
                           media_type=fmt.media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await self._whole(request, key, reply, timing)
        if answer is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(fmt.whole(answer, timing))

    async def _events(self, request: Request, reply: Reply, fmt, timing: Timing):
        """The answer as the protocol's stream; a client gone (Starlette cancels this) cancels the sequence."""
        over = False
        try:
            if head := fmt.head():
                yield head
            while not over:
                event = await reply.get()
                if isinstance(event, str):
                    timing.first = timing.first or time.perf_counter()
                    yield fmt.piece(event)
                    continue
                over = True
                if isinstance(event, ApiError):
                    request.state.tokens = "ended by an error"
                    yield fmt.stream_error(event)
                else:
                    self._done(request, event, timing)
                    yield fmt.tail(event, timing)
        finally:
            if not over:  # (the response's own close cancels the sequence)
                request.state.tokens = "cancelled (client gone)"

    async def _whole(self, request: Request, key: int, reply: Reply, timing: Timing):
        """The answer once complete, or None when the client went away first (its sequence cancelled)."""
        async def collect():
            while isinstance(event := await reply.get(), str):
                timing.first = timing.first or time.perf_counter()
            if isinstance(event, ApiError):
                raise event
            return event

        work, watch = asyncio.create_task(collect()), asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                self.engine.cancel(key)
                request.state.tokens = "cancelled (client gone)"
        if not work.done() or work.cancelled():
            return None
        answer = work.result()
        self._done(request, answer, timing)
        return answer

    def _done(self, request: Request, answer, timing: Timing) -> None:
        r = answer.result
        timing.ended = time.perf_counter()
        timing.first = timing.first or timing.ended
        request.state.tokens = f"{r.prompt_tokens}+{r.completion_tokens} tokens {r.finish_reason}" + (
            f", {r.stats['accepted']} of {r.stats['drafted']} drafted accepted" if r.stats.get("drafted") else "")
        self.counts.ttft.observe(timing.to_first())
        if r.completion_tokens > 1:
            self.counts.per_token.observe((timing.ended - timing.first) / (r.completion_tokens - 1))

    def _finished(self, answer) -> None:  # (engine thread: prometheus_client's counters take a lock)
        if answer.result is not None:
            self.counts.answered(answer.result)

    # --- helpers ---------------------------------------------------------------------

    def _model(self, body: dict, openai_names: bool = False) -> str:
        """The model a request names, which must be this server's (a client never makes it load another);
        none named: this one."""
        name = body.get("model")
        if name is None or name == "":
            return self.site.names[0]
        if not isinstance(name, str):
            raise bad("model must be a string", "model")
        if name in self.site.names or (not openai_names and ollama.names_one_of(name, self.site.names)):
            return name
        raise ApiError(404, f"the model {name!r} is not served here; this server serves "
                            f"{', '.join(map(repr, self.site.names))}", param="model", code="model_not_found")

    def _n_ctx(self) -> int:
        model = self.engine.model
        if model is None:
            raise ApiError(503, "the model is still loading", code="loading", retry_after=1)
        return model.n_ctx

    def _model_details(self) -> dict:
        if self._details is None:
            from edgeinfer.ggufinfo import inspect

            info = inspect(self.engine.prepared.path, self.engine.prepared.cache_file)
            size = f"{info.parameters / 1e9:.1f}B" if info.parameters >= 1e8 else f"{info.parameters / 1e6:.0f}M"
            self._details = {"format": "gguf", "family": info.architecture, "families": [info.architecture],
                             "parameter_size": size, "quantization_level": info.quantization, "parent_model": ""}
        return self._details


async def _read_json(request: Request) -> dict:
    """The body as a JSON object; 413 past BODY_LIMIT (by Content-Length before reading, else as it comes)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > BODY_LIMIT:
        raise ApiError(413, f"the body is {int(length)} bytes; the limit is {BODY_LIMIT >> 20} MiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > BODY_LIMIT:
            raise ApiError(413, f"the body is over the limit of {BODY_LIMIT >> 20} MiB")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad("the body must be a JSON object")
    return data


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


class _Stream(StreamingResponse):
    """A streamed answer that cancels its sequence once it is over, however it ended: a client gone before
    the first chunk leaves the iterator unstarted, and its own `finally` never runs. (After a complete
    answer the cancel finds nothing to end.)"""

    def __init__(self, content, on_close: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
