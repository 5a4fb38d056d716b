"""`edgeinfer serve`: an OpenAI- and Ollama-compatible HTTP server over the batched engine.

`prepare` finds (and pulls) the model as `run --batch` does; `serve` listens, loads the model in the engine
thread (GET /health answers 503 until it is ready), and answers until SIGTERM or Ctrl-C, when it stops
accepting, lets the answers under way finish for `grace` seconds, cancels the rest, and returns.
docs/serve.md explains the design. Nothing outside this package knows HTTP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgeinfer.errors import EdgeinferError, UsageError

if TYPE_CHECKING:
    from edgeinfer.api import Prepared
    from edgeinfer.engine import LoadOptions
    from edgeinfer.progress import ProgressReporter
    from edgeinfer.sampling import SamplingParams
    from edgeinfer.speculative import DraftOptions

DEFAULT_QUEUE = 64


@dataclass(frozen=True)
class ServeOptions:
    """How the server listens and whom it answers."""

    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (the ready line names it)
    queue: int = DEFAULT_QUEUE  # requests that may wait beyond the sequences being answered
    api_key: str | None = None
    cors: tuple[str, ...] = ()  # origins allowed to call from a browser
    aliases: tuple[str, ...] = ()  # more names the model answers to
    grace: float = 10.0  # seconds the answers under way may take to finish at SIGTERM or Ctrl-C

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError("--port must be between 0 and 65535")
        if self.queue < 0:
            raise UsageError("--queue must be 0 or more")
        if self.grace < 0:
            raise UsageError("--grace must be 0 or more seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("--api-key is empty")

    def warnings(self) -> list[str]:
        if self.api_key is None and not _loopback(self.host):
            return [f"listening on {self.host} without --api-key: anyone who can reach this machine can use the model"]
        return []


def prepare(model: str | None, *, parallel: int | None = None, sampling: SamplingParams | None = None,
            max_tokens: int | None = None, load: LoadOptions | None = None, draft: DraftOptions | None = None,
            progress: ProgressReporter | None = None, lib=None) -> Prepared:
    """The model found (pulled if missing, reported to `progress`) and checked to fit with `parallel`
    sequences (None: as many as earlier runs measured best here, within memory), as `run --batch` does;
    with `draft`, its draft found, paired and planned as `run --draft` does (the plan may turn it off)."""
    from edgeinfer import api
    from edgeinfer.sampling import SamplingParams

    request = api.BatchRequest(model=model, sampling=sampling or SamplingParams(), max_tokens=max_tokens,
                               load=load or api.LoadOptions(), parallel=parallel, draft=draft)
    prepared = api.prepare(request, progress, lib=lib)
    # (a request alone speculates in this context: its cache is the type the plan's passes are exact with)
    cache = request.load.decided(prepared.plan.run_cache).cache_type
    return replace(prepared, load=replace(prepared.load, cache_type=cache))


def served_name(prepared: Prepared) -> str:
    """The model's name on the API: its reference, or a file's stem for a path."""
    name = prepared.name
    return prepared.path.stem if Path(name).expanduser().is_file() else name


def serve(prepared: Prepared, options: ServeOptions = ServeOptions(), *, log: Callable[[str], None] = print) -> None:
    """Listen, load the model, answer until SIGTERM or Ctrl-C (`log` hears the ready line and one line per
    request). A model that fails to load is raised here, after the server has closed."""
    import uvicorn

    from edgeinfer.serve.app import Site, build
    from edgeinfer.serve.worker import Engine

    sock = _listen(options.host, options.port)
    address = _address(sock)
    names = list(dict.fromkeys([served_name(prepared), *options.aliases]))
    server, ready, lock = None, {}, threading.Lock()

    def announce(**what) -> None:  # (the engine thread, with the model; uvicorn's, when it listens)
        with lock:
            ready.update(what)
            if "model" not in ready or "listening" not in ready or "said" in ready:
                return
            ready["said"], model = True, ready["model"]
        log(f"serving {names[0]} on {address} ({model.n_seq} sequences of {model.n_ctx} tokens, "
            f"queue {options.queue}); Ctrl-C stops")

    def failed(error: EdgeinferError) -> None:
        if server is not None:
            server.should_exit = True

    engine = Engine(prepared, options.queue, on_ready=lambda model: announce(model=model), on_failure=failed)
    app = build(Site(engine, names, options.api_key, options.cors, log))
    # (uvicorn's own deadline is a backstop: at `grace` the engine cancels what is left, and the answers
    # under way end with an error event, written as any other; uvicorn would cancel their tasks mid-write)
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=options.grace + 5, server_header=False)
    server = _server(config, options.grace, engine.cancel_all, lambda: announce(listening=True))
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    if engine.failure is not None:
        raise engine.failure


def _server(config, grace: float, cancel_all: Callable[[], None], listening: Callable[[], None]):
    """uvicorn's Server, except that it says when it listens, that its shutdown cancels the answers still
    under way after `grace` seconds, and that a SIGTERM or Ctrl-C that stopped it gracefully is not raised
    again once it has stopped (uvicorn re-raises it, so the process would die of the signal, not exit 0)."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def serve(self, sockets=None) -> None:
            with self.capture_signals():
                await self._serve(sockets)
                getattr(self, "_captured_signals", []).clear()  # (uvicorn >= 0.29 re-raises what is kept there)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                listening()

        async def shutdown(self, sockets=None) -> None:
            deadline = asyncio.get_running_loop().call_later(grace, cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    return Server(config)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear error before the model loads."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}: {exc.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


__all__ = ["ServeOptions", "prepare", "serve", "served_name"]
