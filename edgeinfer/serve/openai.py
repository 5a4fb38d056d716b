"""The OpenAI API's shapes: /v1/chat/completions and /v1/completions bodies in, their answers out
(whole, or as server-sent events ending with `data: [DONE]`), and its error object."""

# Fields the API defines that change nothing here are accepted: presence_penalty and frequency_penalty
# are checked for range and ignored (docs/serve.md), as are user, metadata, store, service_tier.
# Fields asking for what this server cannot give (n > 1, logprobs, tools, echo, suffix) are a 400.

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from edgeinfer.serve.ask import ApiError, Ask, Fields, Timing, bad, refuse, structured_output
from edgeinfer.textstream import is_text

if TYPE_CHECKING:
    from edgeinfer.batch import Answer

FINISH = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
             "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty"}  # (the last three: llama-server's)


def error_body(error: ApiError) -> dict:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
    return {"error": {"message": str(error), "type": kinds.get(error.status, "server_error"), "param": error.param,
                      "code": error.code}}


def _common(body: dict, fields: Fields) -> dict:
    """What both endpoints read alike: sampling, length, stop, stream."""
    if (n := fields.whole("n")) not in (None, 1):
        raise bad("n must be 1: this server answers with one choice", "n")
    fields.number("presence_penalty", -2, 2)
    fields.number("frequency_penalty", -2, 2)
    refuse(body, "logprobs", "top_logprobs", "logit_bias", "tools", "functions", "tool_choice", "function_call",
           "audio", "prediction")
    from edgeinfer.grammar import from_response_format

    constraint = structured_output(from_response_format, fields.object("response_format"), "response_format")
    stream = bool(fields.flag("stream"))
    options = Fields(fields.object("stream_options") or {}, "stream_options.")
    max_tokens = fields.whole("max_completion_tokens", 1)
    max_tokens = max_tokens if max_tokens is not None else fields.whole("max_tokens", 1)
    return {"sampling": fields.sampling(**_SAMPLING), "max_tokens": max_tokens, "stop": fields.stop(),
            "stream": stream, "usage": bool(stream and options.flag("include_usage")), "constraint": constraint}


def chat_ask(body: dict) -> tuple[Ask, bool]:
    """A chat completion request as an Ask, and whether its stream ends with a usage chunk."""
    fields = Fields(body)
    common = _common(body, fields)
    usage = common.pop("usage")
    return Ask(messages=_messages(body.get("messages")), **common), usage


def completion_ask(body: dict) -> tuple[Ask, bool]:
    fields = Fields(body)
    refuse(body, "echo", "suffix")
    if (best_of := fields.whole("best_of")) not in (None, 1):
        raise bad("best_of must be 1", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not (is_text(prompt) and prompt):
        raise bad("prompt must be a non-empty string (one prompt: a list of several is not supported)", "prompt")
    common = _common(body, fields)
    usage = common.pop("usage")
    return Ask(prompt=prompt, **common), usage


def _messages(value: object) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", where)
        role = message.get("role")
        if role not in _ROLES:
            raise bad(f"{where}.role must be system, developer, user or assistant (tools are not supported)",
                      f"{where}.role")
        messages.append({"role": _ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return tuple(messages)


def _content(value: object, where: str) -> str:
    """A message's text: a string, or a list of text parts (images and audio are not supported)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return Fields({where: value}).text(where)
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise bad(f"{where} may hold text parts only (images and audio are not supported)", where)
            parts.append(Fields(part, f"{where}.").text("text") or "")
        return "".join(parts)
    raise bad(f"{where} must be a string or a list of text parts", where)


class _Format:
    """One endpoint's answer, whole or as server-sent events."""

    media_type = "text/event-stream"
    _id_prefix = ""

    def __init__(self, model: str, usage: bool) -> None:
        self.model, self.usage = model, usage
        self.id, self.created = self._id_prefix + uuid.uuid4().hex[:24], int(time.time())

    def _envelope(self, obj: str, choices: list, **more: object) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **more}

    @staticmethod
    def event(data: dict | str) -> bytes:
        return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()

    @staticmethod
    def usage_of(answer: Answer) -> dict:
        r = answer.result
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                # (a conversation's earlier turns, kept in the cache by the engine: not read again)
                "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}

    def tail(self, answer: Answer, timing: Timing) -> bytes:
        last = self.event(self._envelope(self.chunk_object, [self._choice_chunk(None, FINISH[answer.result.finish_reason])]))
        if self.usage:
            last += self.event(self._envelope(self.chunk_object, [], usage=self.usage_of(answer)))
        return last + self.event("[DONE]")

    def head(self) -> bytes | None:
        return None

    def piece(self, text: str) -> bytes:
        return self.event(self._envelope(self.chunk_object, [self._choice_chunk(text, None)]))

    def stream_error(self, error: ApiError) -> bytes:
        return self.event(error_body(error))


class ChatFormat(_Format):
    _id_prefix = "chatcmpl-"
    chunk_object = "chat.completion.chunk"

    def head(self) -> bytes:
        return self.event(self._envelope(self.chunk_object, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]))

    def _choice_chunk(self, text: str | None, finish: str | None) -> dict:
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}

    def whole(self, answer: Answer, timing: Timing) -> dict:
        r = answer.result
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                  "finish_reason": FINISH[r.finish_reason]}
        return self._envelope("chat.completion", [choice], usage=self.usage_of(answer))


class CompletionFormat(_Format):
    _id_prefix = "cmpl-"
    chunk_object = "text_completion"

    def _choice_chunk(self, text: str | None, finish: str | None) -> dict:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def whole(self, answer: Answer, timing: Timing) -> dict:
        r = answer.result
        choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": FINISH[r.finish_reason]}
        return self._envelope("text_completion", [choice], usage=self.usage_of(answer))


def models(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "edgeinfer"}
                                       for name in names]}
