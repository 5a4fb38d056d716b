"""A conversation with a loaded model: messages, the context window, save and load."""

# The KV cache is reused across turns for free: each turn renders the whole
# conversation, and `Model.prefill` evaluates only what follows the prefix it
# already holds. When the conversation outgrows the context, the oldest turns go
# (the system message stays) and the reply says how many.

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgeinfer.engine import GenerationResult, Model, Stepper, generate
from edgeinfer.errors import EdgeinferError, GenerationError, UsageError
from edgeinfer.grammar import Constraint, Grammar, judged
from edgeinfer.sampling import LLAMA_CPP, Sampler, SamplingParams, setting_names, with_setting
from edgeinfer.store import atomic_write_text
from edgeinfer.template import Message, chat_tokens
from edgeinfer.textstream import is_text

ANSWER_RESERVE = 512  # tokens kept free for the answer when trimming old turns
LOAD_LIMIT = 16 << 20  # bytes of a saved conversation that /load reads, as `run --file` reads of a file


@dataclass
class Conversation:
    model: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    turns: list[Message] = field(default_factory=list)  # user and assistant messages, alternating

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns]

    def save(self, path: Path) -> None:
        """Write the conversation as JSON, whole or not at all; only a regular file is ever replaced."""
        payload = {"version": 1, "model": self.model, "system": self.system,
                   "sampling": asdict(self.sampling), "messages": self.turns}
        try:
            _refuse_special_file(path)
            atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        except FileExistsError as exc:  # (mkdir of a folder on the way that is a file)
            raise UsageError(f"cannot save to {path}: {exc.filename} is not a folder") from None
        except (OSError, ValueError) as exc:  # (ValueError: a NUL byte in the name)
            raise UsageError(f"cannot save to {path}: {_reason(exc)}") from None

    @classmethod
    def load(cls, path: Path) -> "Conversation":
        """A saved conversation, checked whole: a file that loads is one the next message can use."""
        try:
            mode = path.stat().st_mode
            if not stat.S_ISREG(mode):  # (a directory, or /dev/zero, which would be read until memory ran out)
                raise UsageError(f"cannot read {path}: {'a directory' if stat.S_ISDIR(mode) else 'not a regular file'}")
            with path.open("rb") as handle:
                data = handle.read(LOAD_LIMIT + 1)
            if len(data) > LOAD_LIMIT:
                raise UsageError(f"{path} is larger than {LOAD_LIMIT >> 20} MiB, the most edgeinfer loads as a "
                                 "conversation (more than any context holds)")
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not a saved edgeinfer conversation (it is not UTF-8 text)") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {_reason(exc)}") from None
        try:
            return cls._from_json(json.loads(text))
        except _NotSaved as exc:
            raise UsageError(f"{path} is not a saved edgeinfer conversation ({exc})") from None
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"{path} is not a saved edgeinfer conversation ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_json(cls, data: object) -> "Conversation":
        if not isinstance(data, dict):
            raise _NotSaved("it is not a JSON object")
        model, system, messages = data.get("model", ""), data.get("system"), data.get("messages")
        if not isinstance(model, str):
            raise _NotSaved(f"its model is {_shown(model)}, not a name")
        if system is not None and not is_text(system):
            raise _NotSaved(f"its system message is {_shown(system)}, not text")
        if not isinstance(messages, list):
            raise _NotSaved("it has no list of messages")
        turns = []
        for number, message in enumerate(messages, 1):
            if not isinstance(message, dict):
                raise _NotSaved(f"message {number} is {_shown(message)}, not an object")
            if message.get("role") not in ("user", "assistant"):
                raise _NotSaved(f"message {number} has role {_shown(message.get('role'))}; a role is user or assistant")
            if not is_text(message.get("content")):
                raise _NotSaved(f"message {number} has content {_shown(message.get('content'))}, not text")
            turns.append({"role": message["role"], "content": message["content"]})
        return cls(model=model, sampling=_sampling(data.get("sampling", {})), system=system, turns=turns)


_SPECIAL_FILES = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
                  (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def _refuse_special_file(path: Path) -> None:
    """The save renames its file over `path`: over a symbolic link that would replace the link (not the
    file it names), over a device node (/dev/null, as root) the system's node. Neither is what was meant."""
    try:
        mode = path.lstat().st_mode
    except OSError:  # (nothing there, or a folder on the way is missing or a file: the write says which)
        return
    kind = next((kind for test, kind in _SPECIAL_FILES if test(mode)), None)
    if kind:
        raise UsageError(f"cannot save to {path}: it is {kind}, not a regular file; nothing was written")


class _NotSaved(Exception):
    """Why a JSON document is not a saved conversation (Conversation.load words it for the user)."""


_JSON_TYPES = {"float | None": (int, float, type(None)), "int | None": (int, type(None))}  # SamplingParams' annotations


def _sampling(data: object) -> SamplingParams:
    """Saved sampling settings, refused here if the sampler the next message builds would fail on them."""
    if not isinstance(data, dict):
        raise _NotSaved("its sampling settings are not a JSON object")
    known = {f.name: f.type for f in fields(SamplingParams)}
    for name, value in data.items():
        if name not in known:
            raise _NotSaved(f"unknown sampling setting {_shown(name)}")
        if isinstance(value, bool) or not isinstance(value, _JSON_TYPES.get(known[name], object)):
            raise _NotSaved(f"sampling setting {name} is {_shown(value)}, not {known[name].replace(' | None', ' or null')}")
    try:
        params = SamplingParams(**data)
        Sampler(params)  # (built as the next message will build it: numpy refuses some seeds SamplingParams may take)
    except (EdgeinferError, TypeError, ValueError) as exc:
        raise _NotSaved(f"sampling settings: {exc}") from None
    return params


def _shown(value: object) -> str:
    """A value from a saved file as JSON, cut short: it goes into a one-line message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _reason(exc: OSError | ValueError) -> str:
    return getattr(exc, "strerror", None) or str(exc)


@dataclass(frozen=True)
class Reply:
    result: GenerationResult
    dropped_turns: int  # old turns removed to make room, 0 when everything fit


class ChatSession:
    def __init__(self, model: Model, conversation: Conversation, *, max_tokens: int | None = None,
                 stop: tuple[str, ...] = (), stepper_factory: Callable[[Model, Sampler], Stepper] | None = None,
                 parse_special: bool = False, constraint: Constraint | None = None) -> None:
        self.model = model
        self.parse_special = parse_special  # read special-token text in messages as the tokens it names
        self.conversation = conversation
        self.max_tokens = max_tokens
        self.stop = stop
        self.stepper_factory = stepper_factory
        self.last: GenerationResult | None = None
        self.constraint = constraint  # structured output for the answers to come (/format, /schema)
        self._grammar: Grammar | None = None  # the constraint on this model, compiled at the next answer

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """One turn: the user's message in, the assistant's answer streamed and kept."""
        turns = self.conversation.turns
        before = list(turns)
        turns.append({"role": "user", "content": text})
        try:
            tokens, dropped = self._fit()
            room = self.model.n_ctx - len(tokens)
            limit = min(self.max_tokens, room) if self.max_tokens else room
            result = generate(self.model, tokens, self.conversation.sampling, max_tokens=limit, stop=self.stop,
                              on_text=on_text, stepper_factory=self.stepper_factory, grammar=self._compiled())
            result = judged(result, self.constraint)
        except BaseException:
            turns[:] = before  # a message that fails leaves the conversation as it was, old turns included
            raise
        turns.append({"role": "assistant", "content": result.text})
        self.last = result
        return Reply(result, dropped)

    def _fit(self) -> tuple[list[int], int]:
        """The prompt tokens, dropping the oldest user/assistant pairs until an answer has room.

        Dropping one pair and rendering the rest again, pair by pair, is quadratic in the
        conversation's length (29 s for one answer after a /load of 2,000 turns). So each
        turn's share of the prompt is estimated once, from its own tokens, as many pairs as
        the excess asks for go at once, and only the turns kept are rendered again to check.
        """
        reserve = min(ANSWER_RESERVE, self.model.n_ctx // 4)
        turns = self.conversation.turns
        tokens = self._prompt(turns)
        shares: list[float] = []
        drop = 0
        while len(tokens) + reserve > self.model.n_ctx:
            if len(turns) - drop <= 1:
                raise GenerationError(
                    f"the message is {len(tokens)} tokens, the context holds {self.model.n_ctx} "
                    f"(with {reserve} kept for the answer); shorten it or raise --ctx-size"
                )
            shares = shares or self._shares(len(tokens))
            excess, freed = len(tokens) + reserve - self.model.n_ctx, 0.0
            while freed < excess and len(turns) - drop > 1:
                freed += sum(shares[drop:drop + 2])
                drop += 2
            tokens = self._prompt(turns[drop:])
        del turns[:drop]
        return tokens, drop

    def _prompt(self, turns: list[Message]) -> list[int]:
        """The prompt tokens for the system message (if any) and these turns."""
        messages = self.conversation.messages()
        head = messages[:len(messages) - len(self.conversation.turns)]
        return chat_tokens(self.model, [*head, *turns], parse_special=self.parse_special)

    def _shares(self, prompt_tokens: int) -> list[float]:
        """Each turn's tokens: its content's, and an even part of what the template adds around the messages."""
        messages = self.conversation.messages()
        own = [len(self.model.tokenize(m["content"], add_special=False, parse_special=False)) for m in messages]
        markup = max(0, prompt_tokens - sum(own)) / (len(messages) + 1)
        return [n + markup for n in own[len(messages) - len(self.conversation.turns):]]

    def _compiled(self) -> Grammar | None:
        if self.constraint is not None and (self._grammar is None or self._grammar.constraint != self.constraint):
            self._grammar = self.constraint.compile(self.model)
        return self._grammar if self.constraint is not None else None

    def constrain(self, constraint: Constraint | None) -> None:
        """Structured output for the answers to come (None: free text again)."""
        self.constraint = constraint

    def reset(self) -> None:
        self.conversation.turns.clear()

    def set_system(self, text: str | None) -> None:
        self.conversation.system = text or None

    def replace(self, conversation: Conversation) -> None:
        """Continue a loaded conversation (same model; its sampling settings come with it, and what it
        leaves unset stays as it was)."""
        conversation.sampling = conversation.sampling.over(self.conversation.sampling)
        self.conversation = conversation

    def set(self, name: str, value: str) -> str:
        """Change one setting for the answers to come, from what a person typed (`temperature`, `0.3`):
        a sampling setting, or max-tokens (`none` lifts the cap); returns the setting's name as `settings`
        has it. A bad name or value is a UsageError."""
        key = name.lower().replace("_", "-")
        key = "temperature" if key == "temp" else key
        if key == "max-tokens":
            self.max_tokens = _max_tokens(value)
        elif key in setting_names():
            self.conversation.sampling = with_setting(self.conversation.sampling, key, value)
        else:
            raise UsageError(f"unknown setting {name!r}; the settings are {', '.join(self.settings())}")
        return key

    def settings(self) -> dict[str, float | int | None]:
        """What the next answer is sampled with, by name (seed None: random; max-tokens None: the context's room)."""
        sampling = self.conversation.sampling.over(LLAMA_CPP)
        return {**{name: getattr(sampling, name.replace("-", "_")) for name in setting_names()},
                "max-tokens": self.max_tokens, "format": self.constraint.describe() if self.constraint else "off"}


def _max_tokens(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"max-tokens takes a whole number of at least 1, or none; not {text!r}")
    return int(text)
