"""What a client asks of the server, whichever protocol it spoke: an `Ask`, read from a JSON body by
`Fields`, which refuses a wrong type with an `ApiError` naming the field."""

# Both protocols (openai.py, ollama.py) turn their bodies into an Ask; the engine thread turns an Ask into
# tokens and a batch job. A field a protocol defines but edgeinfer cannot honour is refused with a 400
# saying so, rather than silently ignored: a client asking for logprobs or tools would otherwise get an
# answer that only looks like what it asked for.

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeinfer.errors import EdgeinferError, UsageError
from edgeinfer.sampling import SamplingParams, out_of_range
from edgeinfer.template import Message
from edgeinfer.textstream import is_text

if TYPE_CHECKING:
    from edgeinfer.grammar import Constraint


class ApiError(EdgeinferError):
    """A request the server answers with an error status: each protocol writes it in its own shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.retry_after = status, param, code, retry_after


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class Ask:
    """One request to answer: a conversation (through the chat template) or a raw prompt."""

    messages: tuple[Message, ...] | None = None
    prompt: str | None = None  # raw completion: the text as the tokenizer sees it
    sampling: SamplingParams = field(default_factory=SamplingParams)  # unchosen: the server's defaults
    max_tokens: int | None = None  # None: the server's default (the model's cap, else the context)
    stop: tuple[str, ...] = ()
    stream: bool = False
    constraint: Constraint | None = None  # structured output (grammar.py): JSON, a JSON Schema


@dataclass
class Timing:
    """A request's moments (time.perf_counter()): arrival, first text, end."""

    arrived: float = field(default_factory=time.perf_counter)
    first: float | None = None
    ended: float | None = None

    def to_first(self) -> float:
        return (self.first or self.ended or time.perf_counter()) - self.arrived

    def total(self) -> float:
        return (self.ended or time.perf_counter()) - self.arrived


class Fields:
    """Typed reads from a request body; a value of the wrong type or range is a 400 naming the field."""

    def __init__(self, body: dict, where: str = "") -> None:
        self.body, self.where = body, where

    def _name(self, name: str) -> str:
        return f"{self.where}{name}"

    def text(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is not None and not is_text(value):
            raise bad(f"{self._name(name)} must be a string", self._name(name))
        return value

    def flag(self, name: str) -> bool | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, bool):
            raise bad(f"{self._name(name)} must be true or false", self._name(name))
        return value

    def whole(self, name: str, least: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{self._name(name)} must be a whole number", self._name(name))
        if least is not None and value < least:
            raise bad(f"{self._name(name)} must be at least {least}", self._name(name))
        return value

    def number(self, name: str, low: float | None = None, high: float | None = None) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad(f"{self._name(name)} must be a number", self._name(name))
        if (low is not None and value < low) or (high is not None and value > high):
            raise bad(f"{self._name(name)} must be between {low} and {high}", self._name(name))
        return float(value)

    def stop(self, name: str = "stop") -> tuple[str, ...]:
        value = self.body.get(name)
        if value is None:
            return ()
        if is_text(value):
            return (value,) if value else ()
        if isinstance(value, list) and all(is_text(s) for s in value):
            return tuple(s for s in value if s)
        raise bad(f"{self._name(name)} must be a string or a list of strings", self._name(name))

    def object(self, name: str) -> dict | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, dict):
            raise bad(f"{self._name(name)} must be an object", self._name(name))
        return value

    def sampling(self, **names: str) -> SamplingParams:
        """SamplingParams from the fields named (setting=field), each checked as the CLI checks its options."""
        chosen: dict[str, float | int] = {}
        for setting, name in names.items():
            value = self.whole(name) if setting in ("top_k", "seed", "repeat_last_n") else self.number(name)
            if value is None:
                continue
            if wrong := out_of_range(setting, value):
                raise bad(f"{self._name(name)} {wrong}", self._name(name))
            chosen[setting] = value
        return SamplingParams(**chosen)


def refuse(body: dict, *names: str, why: str = "is not supported by this server") -> None:
    """A 400 for the first of `names` the body gives a value (other than null, false or empty)."""
    for name in names:
        if body.get(name) not in (None, False, [], {}, ""):
            raise bad(f"{name} {why}", name)


def structured_output(read: Callable[[Any], Constraint | None], value: Any, param: str) -> Constraint | None:
    """A protocol's structured-output field (OpenAI's response_format, Ollama's format) as a constraint, its
    grammar parsed by the engine thread when it compiles it (llama.cpp is called from there alone); a bad
    field is a 400 naming it."""
    try:
        return read(value)
    except UsageError as exc:
        raise bad(str(exc), param) from None
