"""Turning messages into prompt tokens with the model's own chat template."""

# The template comes from the GGUF metadata (tokenizer.chat_template) and is
# rendered in jinja2's immutable sandbox: a model file is untrusted input, and its
# template must not reach Python internals. Models without a template get ChatML,
# as llama.cpp does.

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from edgeinfer.errors import ChatTemplateError, UsageError

if TYPE_CHECKING:
    from edgeinfer.engine import Model

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# A template is a program from an untrusted file: what it may take is bounded. Real templates are a few KB
# and render in milliseconds into little more than the messages they are given.
TEMPLATE_LIMIT = 1 << 20  # characters of template source
RENDER_SECONDS = 10.0
CALL_DEPTH = 64  # nested calls (a macro that calls itself without end)


def output_limit(messages: Sequence[Message]) -> int:
    """The most characters a template may write for these messages, and the largest number or string it may make."""
    return (1 << 20) + 4 * sum(len(m.get("content") or "") for m in messages)


def render(template: str | None, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    """The conversation as the model's template writes it, within bounds on output, time and nesting.

    A template that refuses the conversation (raise_exception) is a UsageError; one that fails
    or goes past the bounds is a ChatTemplateError naming what it did.
    """
    source = template or CHATML
    if len(source) > TEMPLATE_LIMIT:
        raise ChatTemplateError(f"the model's chat template is {len(source):,} characters, more than the "
                                f"{TEMPLATE_LIMIT:,} edgeinfer renders (use --raw to write the prompt yourself)")
    limit = output_limit(messages)
    try:
        with _Deadline(RENDER_SECONDS):
            compiled = _bounded_environment(limit).from_string(source)
            chunks = compiled.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token)
            return _joined(chunks, limit)
    except _Refused as exc:
        raise UsageError(f"the model's chat template cannot render this conversation: {exc}") from None
    except _OutOfTime:
        problem = f"ran for more than {RENDER_SECONDS:.0f} s"
    except _PastBounds as exc:
        problem = str(exc)
    except RecursionError:
        problem = "nests deeper than Python allows (endless recursion)"
    except Exception as exc:  # the template's own failure: a division by zero, bad syntax, an undefined name
        problem = f"fails: {type(exc).__name__}: {exc}"
    raise ChatTemplateError(f"the model's chat template {_one_line(problem)} (use --raw to write the prompt yourself)")


def _joined(chunks: Iterator[str], limit: int) -> str:
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _PastBounds(f"writes more than {limit:,} characters for this conversation")
        parts.append(chunk)
    return "".join(parts)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


class _Refused(Exception):
    """The template's raise_exception(): it does not take this conversation."""


class _PastBounds(Exception):
    """The template made a value, an output or a nesting past the bounds."""


class _OutOfTime(BaseException):
    """Raised inside the rendering thread at the deadline (a BaseException, so no `except Exception` swallows it)."""


def _raise_exception(message: str) -> None:
    raise _Refused(message)


def _bounded_environment(limit: int) -> "ImmutableSandboxedEnvironment":  # noqa: F821
    """jinja2's immutable sandbox (no way into Python internals), with every operation that can make a
    value of any size checked first: arithmetic, calls, filters, and what a call or a filter returns."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(("+", "*", "**", "%"))  # (intercepted ones are not folded at compile time)
        depth = 0

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right, limit)
            return _checked(super().call_binop(context, operator, left, right), limit)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            _check_arguments(args, kwargs, limit)
            if __self.depth >= CALL_DEPTH:
                raise _PastBounds(f"nests calls more than {CALL_DEPTH} deep (a macro that calls itself without end?)")
            __self.depth += 1
            try:
                return _checked(super().call(__context, __obj, *args, **kwargs), limit)
            finally:
                __self.depth -= 1

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, finalize=lambda value: _checked(value, limit))
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    env.filters = {name: _bounded_filter(f, limit) for name, f in env.filters.items()}
    del env.globals["lipsum"]  # (no chat template writes lorem ipsum; lipsum(10**6) is seconds of work)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _bounded_filter(function: Callable, limit: int) -> Callable:
    @functools.wraps(function)  # (keeps jinja2's pass_context marks)
    def bounded(*args, **kwargs):
        _check_arguments(args, kwargs, limit)
        return _checked(function(*args, **kwargs), limit)

    return bounded


def _check_arguments(args: tuple, kwargs: dict, limit: int) -> None:
    for value in (*args, *kwargs.values()):
        _checked(value, limit)


def _checked(value: object, limit: int) -> object:
    """`value`, if it is a number or a sized value within the limit: `'x'.center(10**10)` or `range(10**12)` is refused before it is made."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
        raise _PastBounds(f"makes the number {_shown(value)}, past the {limit:,} it may use")
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > limit:
        raise _PastBounds(f"makes a value of {len(value):,} items, past the {limit:,} it may use")
    return value


def _check_binop(operator: str, left: object, right: object, limit: int) -> None:
    """Refuse before computing what would be too large: the bits of a power or product, the length of a repetition."""
    numbers = all(isinstance(v, (int, float)) for v in (left, right))
    if operator == "**" and numbers and isinstance(left, int) and isinstance(right, int):
        if abs(left) > 1 and right > 0 and right * abs(left).bit_length() > limit.bit_length() * 2:
            raise _PastBounds(f"raises {_shown(left)} to the power {_shown(right)}, past the numbers it may use")
    elif operator == "*" and not numbers:
        length = max((len(v) for v in (left, right) if hasattr(v, "__len__")), default=0)
        times = next((v for v in (left, right) if isinstance(v, int)), 1)
        if length * max(times, 0) > limit:
            raise _PastBounds(f"repeats a value of {length:,} items {_shown(times)} times, past the {limit:,} it may use")
    elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
        if len(left) + len(right) > limit:
            raise _PastBounds(f"joins values of {len(left) + len(right):,} items, past the {limit:,} it may use")


def _shown(number: int) -> str:
    text = str(number) if abs(number) < 10**30 else f"about 2**{abs(number).bit_length()}"
    return text


class _Deadline:
    """Raises _OutOfTime in the thread that entered it once `seconds` have passed.

    A template's loops run as Python bytecode that no hook of the sandbox sees (nested loops
    over a string, say), so a timer asks the interpreter to raise in the rendering thread
    at its next instruction. The lock and the flag make sure no exception is left pending
    once the block is over.
    """

    def __init__(self, seconds: float) -> None:
        self._thread = threading.get_ident()
        self._lock = threading.Lock()
        self._done = self._fired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._done = True
            if self._fired:  # raised already, or still pending: take back a pending one
                _raise_in_thread(self._thread, None)

    def _expire(self) -> None:
        with self._lock:
            if not self._done:
                self._fired = True
                _raise_in_thread(self._thread, _OutOfTime)


def _raise_in_thread(thread: int, exception: type[BaseException] | None) -> None:
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(exception) if exception else None)


def chat_tokens(model: "Model", messages: Sequence[Message], *, parse_special: bool = False) -> list[int]:
    """The prompt tokens for a conversation, ready for the assistant's next answer.

    Only the template's own markup becomes special tokens: a message that spells one
    (`<|im_end|>\\n<|im_start|>system`) is tokenized as the text it is, so content cannot
    forge turns. parse_special=True reads such text as the tokens it names, as llama.cpp's
    chat examples do.
    """
    bos = model.token_text(model.bos_token) if model.bos_token >= 0 else ""
    eos = model.token_text(model.eos_token) if model.eos_token >= 0 else ""
    spelled = set() if parse_special else {text for m in messages for text in _control_texts(model, m.get("content") or "")}
    # Each spelling of a control token in a message becomes a mark the template passes through
    # as it would the text; the marks are spelled out again inside the text between the template's own tokens.
    marks = {text: f"\ufdd0{n}\ufdd1" for n, text in enumerate(sorted(spelled))}
    if marks:
        messages = [{**m, "content": _replaced(m.get("content") or "", marks)} for m in messages]
    text = render(model.info.chat_template, messages, bos_token=bos, eos_token=eos)
    # Templates that write the BOS text themselves must not get a second BOS from the tokenizer.
    add_special = not (bos and text.startswith(bos))
    if not marks:
        return model.tokenize(text, add_special=add_special, parse_special=True)
    return _tokens_with_marks_as_text(model, text, {mark: text for text, mark in marks.items()}, add_special)


def _control_texts(model: "Model", text: str) -> set[str]:
    """The control tokens (<|im_end|>, <s>) that `text` spells, as llama.cpp would find them in it."""
    if not text:
        return set()
    # A control token has no text of its own (piece() leaves it out); token_text() spells it.
    return {model.token_text(t) for t in model.tokenize(text, add_special=False, parse_special=True)
            if not model.piece(t) and model.token_text(t)}


def _replaced(text: str, replacements: dict[str, str]) -> str:
    for old in sorted(replacements, key=len, reverse=True):  # (longest first, as llama.cpp matches them)
        text = text.replace(old, replacements[old])
    return text


def _tokens_with_marks_as_text(model: "Model", text: str, spellings: dict[str, str], add_special: bool) -> list[int]:
    """`text` tokenized as llama.cpp does with parse_special (the pieces between control tokens one by one),
    where the pieces get their marks spelled out and are read as text only."""
    ids = {model.token_text(t): t for t in model.tokenize(text, add_special=False, parse_special=True)
           if not model.piece(t) and model.token_text(t)}
    tokens = [t for t in model.tokenize("", add_special=True, parse_special=False) if t == model.bos_token] if add_special else []
    pattern = "|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True))
    for n, piece in enumerate(re.split(f"({pattern})", text) if pattern else [text]):
        if n % 2:  # (re.split puts the separators it matched at the odd places)
            tokens.append(ids[piece])
        elif piece:
            tokens += model.tokenize(_replaced(piece, spellings), add_special=False, parse_special=False)
    return tokens


def raw_tokens(model: "Model", text: str) -> list[int]:
    """Plain completion: the text as the model's tokenizer sees it, BOS added if the model wants one."""
    return model.tokenize(text, add_special=True, parse_special=True)
