"""Ollama's API shapes: /api/chat and /api/generate bodies in, their answers out (NDJSON lines by default,
one object with `stream: false`), /api/tags and /api/version, and its error object."""

# `options` honoured: num_predict (-1 and -2: no limit but the context), temperature, top_k, top_p, min_p,
# seed, stop, repeat_penalty, repeat_last_n. num_ctx is the server's --ctx-size: a request asking for more
# is refused (400) rather than answered in a smaller context than it counted on; less is fine. Other options
# (num_thread, num_gpu, mirostat, ...) belong to Ollama's runner and are ignored, as is keep_alive.
# Durations are nanoseconds, as Ollama reports them; load_duration is 0: the model was loaded at start.

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from edgeinfer.serve.ask import ApiError, Ask, Fields, Timing, bad, refuse, structured_output

if TYPE_CHECKING:
    from edgeinfer.batch import Answer

VERSION = "0.6.0"  # the Ollama API this server speaks, for clients that check it (GET /api/version)
_ROLES = ("system", "user", "assistant")
_SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
             "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n"}


def error_body(error: ApiError) -> dict:
    return {"error": str(error)}


def _common(body: dict, n_ctx: int) -> dict:
    fields = Fields(body)
    refuse(body, "images", "tools", "template", "context", "suffix", "think")
    from edgeinfer.grammar import from_ollama_format

    constraint = structured_output(from_ollama_format, body.get("format") or None, "format")
    options = Fields(fields.object("options") or {}, "options.")
    num_ctx = options.whole("num_ctx", 1)
    if num_ctx is not None and num_ctx > n_ctx:
        raise bad(f"options.num_ctx is {num_ctx}, this server's context holds {n_ctx} tokens (its --ctx-size)",
                  "options.num_ctx")
    predict = options.whole("num_predict")
    stream = fields.flag("stream")
    return {"sampling": options.sampling(**_SAMPLING), "max_tokens": predict if predict and predict > 0 else None,
            "stop": options.stop(), "stream": True if stream is None else stream, "constraint": constraint}


def chat_ask(body: dict, n_ctx: int) -> Ask | None:
    """An /api/chat request as an Ask; None for one without messages (Ollama's way to load a model)."""
    messages = body.get("messages")
    if messages is None or messages == []:
        _common(body, n_ctx)
        return None
    if not isinstance(messages, list):
        raise bad("messages must be a list of {role, content} objects", "messages")
    read = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise bad(f"{where} must be an object with a role: system, user or assistant (tools are not supported)",
                      where)
        refuse(message, "images", "tool_calls")
        read.append({"role": message["role"], "content": Fields(message, f"{where}.").text("content") or ""})
    return Ask(messages=tuple(read), **_common(body, n_ctx))


def generate_ask(body: dict, n_ctx: int) -> Ask | None:
    """An /api/generate request as an Ask (raw: the prompt as it is, else through the chat template, after
    `system`); None for an empty prompt (Ollama's way to load a model)."""
    fields = Fields(body)
    prompt, system, raw = fields.text("prompt"), fields.text("system"), fields.flag("raw")
    common = _common(body, n_ctx)
    if not prompt:
        return None
    if raw:
        return Ask(prompt=prompt, **common)
    messages = ({"role": "system", "content": system},) if system else ()
    return Ask(messages=(*messages, {"role": "user", "content": prompt}), **common)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Format:
    media_type = "application/x-ndjson"

    def __init__(self, model: str) -> None:
        self.model = model

    @staticmethod
    def line(data: dict) -> bytes:
        return (json.dumps(data, ensure_ascii=False) + "\n").encode()

    def head(self) -> bytes | None:
        return None

    def piece(self, text: str) -> bytes:
        return self.line({"model": self.model, "created_at": _now(), **self._text(text), "done": False})

    def tail(self, answer: Answer, timing: Timing) -> bytes:
        return self.line(self.whole(answer, timing, ""))

    def whole(self, answer: Answer, timing: Timing, text: str | None = None) -> dict:
        r = answer.result
        first, total = timing.to_first(), timing.total()
        return {"model": self.model, "created_at": _now(), **self._text(r.text if text is None else text),
                "done": True, "done_reason": "length" if r.finish_reason in ("length", "context") else "stop",
                "total_duration": _ns(total), "load_duration": 0, "prompt_eval_count": r.prompt_tokens,
                "prompt_eval_duration": _ns(first), "eval_count": r.completion_tokens,
                "eval_duration": _ns(total - first)}

    def loaded(self) -> dict:
        """The answer to a request without a prompt: the model is loaded (it always is)."""
        return {"model": self.model, "created_at": _now(), **self._text(""), "done": True, "done_reason": "load"}

    def stream_error(self, error: ApiError) -> bytes:
        return self.line(error_body(error))


class ChatFormat(_Format):
    @staticmethod
    def _text(text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}


class GenerateFormat(_Format):
    @staticmethod
    def _text(text: str) -> dict:
        return {"response": text}


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def tags(names: list[str], size: int, modified: float, details: dict) -> dict:
    when = datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"models": [{"name": name, "model": name, "modified_at": when, "size": size, "digest": "",
                        "details": details} for name in names]}


def names_one_of(name: str, names: list[str]) -> bool:
    """Whether the model name a request gives is one of `names`, allowing Ollama's `:latest` tag."""
    return name in names or (name.endswith(":latest") and name[: -len(":latest")] in names)

