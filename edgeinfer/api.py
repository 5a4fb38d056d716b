"""The Python API behind `edgeinfer run`: everything the command does, as one call.

    from edgeinfer.api import RunRequest, run
    result = run(RunRequest(prompt="Why is the sky blue?", sampling=SamplingParams(temperature=0)))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field

from edgeinfer.chat import ChatSession, Conversation
from edgeinfer.engine import GenerationResult, LoadOptions, generate, load
from edgeinfer.errors import UsageError
from edgeinfer.library import Library, locate
from edgeinfer.progress import ProgressReporter
from edgeinfer.sampling import SamplingParams
from edgeinfer.speculative.costs import CostBook
from edgeinfer.speculative import (DraftOptions, SpeculationPlan, check_pair, plan_speculation, resolve_draft,
                                   speculation)
from edgeinfer.template import Message, chat_tokens, raw_tokens


@dataclass(frozen=True)
class RunRequest:
    prompt: str
    model: str | None = None  # any model reference; None: the catalog's default
    system: str | None = None
    raw: bool = False  # plain completion, no chat template (special-token text in it is read as the tokens it names)
    parse_special: bool = False  # read special-token text in the prompt and system message as tokens, not text
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    load: LoadOptions = field(default_factory=LoadOptions)
    draft: DraftOptions | None = None  # speculative decoding: a draft model, or "ngram" (prompt lookup)

    def __post_init__(self) -> None:
        """Checked here, as the request is made: before a missing model is pulled for it."""
        if not self.prompt.strip():
            raise UsageError("empty prompt: give one as an argument, on stdin, or with --file")
        check_max_tokens(self.max_tokens)

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt}]


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")


def run(request: RunRequest, *, on_text: Callable[[str], None] | None = None,
        progress: ProgressReporter | None = None, lib: Library | None = None) -> GenerationResult:
    """Answer one prompt, streaming text through `on_text`; a catalog model is pulled first if missing."""
    lib = lib or Library.open()
    path = locate(lib, request.model, pull_missing=True, progress=progress)
    cache = lib.store.inspect_cache
    plan = checked_plan(lib, request.model, path, request.draft, request.load, progress)
    with load(path, request.load, cache) as model, \
            speculation(model, plan, request.load, request.max_tokens, cache) as stepper_factory:
        tokens = raw_tokens(model, request.prompt) if request.raw else \
            chat_tokens(model, request.messages(), parse_special=request.parse_special)
        return generate(model, tokens, request.sampling, max_tokens=request.max_tokens, stop=request.stop,
                        on_text=on_text, stepper_factory=stepper_factory)


@contextmanager
def open_chat(model: str | None = None, *, system: str | None = None, sampling: SamplingParams | None = None,
              load_options: LoadOptions | None = None, max_tokens: int | None = None, stop: tuple[str, ...] = (),
              draft: DraftOptions | None = None, progress: ProgressReporter | None = None,
              lib: Library | None = None, parse_special: bool = False) -> Iterator[ChatSession]:
    """A chat session on a loaded model (pulled first if missing), with its draft if asked; both closed on exit.

    parse_special: read special-token text in messages (`<|im_end|>`) as the tokens it names; by
    default only the template's own markup becomes special tokens.
    """
    check_max_tokens(max_tokens)
    lib = lib or Library.open()
    load_options = load_options or LoadOptions()
    path = locate(lib, model, pull_missing=True, progress=progress)
    plan = checked_plan(lib, model, path, draft, load_options, progress)
    with load(path, load_options, lib.store.inspect_cache) as loaded, \
            speculation(loaded, plan, load_options, max_tokens, lib.store.inspect_cache) as factory:
        conversation = Conversation(model=model or lib.catalog.default, sampling=sampling or SamplingParams(), system=system)
        yield ChatSession(loaded, conversation, max_tokens=max_tokens, stop=stop, stepper_factory=factory,
                          parse_special=parse_special)


def checked_plan(lib: Library, target_ref: str | None, target: Path, draft: DraftOptions | None,
                 load_options: LoadOptions, progress: ProgressReporter | None = None) -> SpeculationPlan:
    """What --draft comes to: the draft model's file, proven to pair with the target before any weights
    load, or prompt lookup, or plain decoding where earlier runs measured that speculation cannot win."""
    if draft is None:
        return SpeculationPlan(None)
    draft_path = resolve_draft(lib, target_ref, draft, progress)
    if draft_path is not None:
        check_pair(target, draft_path, lib.store.inspect_cache)
    return plan_speculation(target, draft_path, draft, load_options, CostBook(lib.store.speculation_costs))
