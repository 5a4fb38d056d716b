"""Turning messages into prompt tokens with the model's own chat template.

The template comes from the GGUF metadata (tokenizer.chat_template) and is
rendered in jinja2's immutable sandbox: a model file is untrusted input, and its
template must not reach Python internals. Models without a template get ChatML,
as llama.cpp does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from edgeinfer.errors import UsageError

if TYPE_CHECKING:
    from edgeinfer.engine import Model

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render(template: str | None, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template or CHATML).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
        )
    except TemplateError as exc:
        raise UsageError(f"the model's chat template cannot render this conversation: {exc}") from None


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def chat_tokens(model: "Model", messages: Sequence[Message]) -> list[int]:
    """The prompt tokens for a conversation, ready for the assistant's next answer."""
    bos = model.token_text(model.bos_token) if model.bos_token >= 0 else ""
    eos = model.token_text(model.eos_token) if model.eos_token >= 0 else ""
    text = render(model.info.chat_template, messages, bos_token=bos, eos_token=eos)
    # Templates that write the BOS text themselves must not get a second BOS from the tokenizer.
    return model.tokenize(text, add_special=not (bos and text.startswith(bos)), parse_special=True)


def raw_tokens(model: "Model", text: str) -> list[int]:
    """Plain completion: the text as the model's tokenizer sees it, BOS added if the model wants one."""
    return model.tokenize(text, add_special=True, parse_special=True)
