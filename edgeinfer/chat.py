"""A conversation with a loaded model: messages, the context window, save and load.

The KV cache is reused across turns for free: each turn renders the whole
conversation, and `Model.prefill` evaluates only what follows the prefix it
already holds. When the conversation outgrows the context, the oldest turns go
(the system message stays) and the reply says how many.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeinfer.engine import GenerationResult, Model, Stepper, generate
from edgeinfer.errors import GenerationError, UsageError
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.store import atomic_write_text
from edgeinfer.template import Message, chat_tokens

ANSWER_RESERVE = 512  # tokens kept free for the answer when trimming old turns


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
        payload = {"version": 1, "model": self.model, "system": self.system,
                   "sampling": asdict(self.sampling), "messages": self.turns}
        atomic_write_text(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Conversation":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            turns = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
            return cls(model=data.get("model", ""), sampling=SamplingParams(**data.get("sampling", {})),
                       system=data.get("system"), turns=turns)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path} is not a saved edgeinfer conversation ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Reply:
    result: GenerationResult
    dropped_turns: int  # old turns removed to make room, 0 when everything fit


class ChatSession:
    def __init__(self, model: Model, conversation: Conversation, *, max_tokens: int | None = None,
                 stop: tuple[str, ...] = (), stepper_factory: Callable[[Model, Sampler], Stepper] | None = None) -> None:
        self.model = model
        self.conversation = conversation
        self.max_tokens = max_tokens
        self.stop = stop
        self.stepper_factory = stepper_factory
        self.last: GenerationResult | None = None

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """One turn: the user's message in, the assistant's answer streamed and kept."""
        self.conversation.turns.append({"role": "user", "content": text})
        try:
            tokens, dropped = self._fit()
        except GenerationError:
            self.conversation.turns.pop()
            raise
        room = self.model.n_ctx - len(tokens)
        limit = min(self.max_tokens, room) if self.max_tokens else room
        result = generate(self.model, tokens, self.conversation.sampling, max_tokens=limit, stop=self.stop,
                          on_text=on_text, stepper_factory=self.stepper_factory)
        self.conversation.turns.append({"role": "assistant", "content": result.text})
        self.last = result
        return Reply(result, dropped)

    def _fit(self) -> tuple[list[int], int]:
        """The prompt tokens, dropping the oldest user/assistant pairs until an answer has room."""
        reserve = min(ANSWER_RESERVE, self.model.n_ctx // 4)
        dropped = 0
        while True:
            tokens = chat_tokens(self.model, self.conversation.messages())
            if len(tokens) + reserve <= self.model.n_ctx:
                return tokens, dropped
            if len(self.conversation.turns) <= 1:
                raise GenerationError(
                    f"the message is {len(tokens)} tokens, the context holds {self.model.n_ctx} "
                    f"(with {reserve} kept for the answer); shorten it or raise --ctx-size"
                )
            del self.conversation.turns[:2]
            dropped += 2

    def reset(self) -> None:
        self.conversation.turns.clear()

    def set_system(self, text: str | None) -> None:
        self.conversation.system = text or None

    def replace(self, conversation: Conversation) -> None:
        """Continue a loaded conversation (same model; its sampling settings come with it)."""
        self.conversation = conversation
