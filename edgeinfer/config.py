"""Configuration read from the environment, in one place."""

# Everything else in edgeinfer receives these values as arguments. The Hugging
# Face variables (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) are read by
# huggingface_hub itself; pip reads its own (PIP_INDEX_URL, PIP_FIND_LINKS, ...).

from __future__ import annotations

import os
from pathlib import Path

from edgeinfer.errors import UsageError


def edgeinfer_home() -> Path:
    """The store's folder: EDGEINFER_HOME, else $XDG_DATA_HOME/edgeinfer, else ~/.local/share/edgeinfer."""
    for variable, below in (("EDGEINFER_HOME", ()), ("XDG_DATA_HOME", ("edgeinfer",))):
        if value := os.environ.get(variable):
            try:
                return expand_user(value).joinpath(*below)
            except UsageError as exc:
                raise UsageError(f"{variable} is {value}: {exc}") from None
    return home_folder() / ".local" / "share" / "edgeinfer"


def home_folder() -> Path:
    """The user's home folder: HOME, else the password database's entry for this user.

    An empty HOME is an error rather than the root folder (where Python's expansion would put ~/x).
    """
    fix = "set HOME, or EDGEINFER_HOME to the folder for edgeinfer's store"
    if os.environ.get("HOME") == "":
        raise UsageError(f"HOME is empty; {fix}")
    try:
        return Path.home()
    except RuntimeError:  # (HOME unset, and no entry for this user id)
        raise UsageError(f"HOME is not set and this user has no home folder in the password database; {fix}") from None


def expand_user(text: str) -> Path:
    """`text` as a path, a leading `~` (this user's home) or `~name` (that user's) expanded."""
    head, _, rest = text.partition("/")
    if head == "~":
        return home_folder() / rest
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UsageError(f"{head} names no user's home folder") from None


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks us not to touch the hub at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def history_file() -> Path:
    """Where `edgeinfer chat` keeps its input history across sessions."""
    return edgeinfer_home() / "chat_history"


def api_key() -> str | None:
    """The key `edgeinfer serve` asks of its clients when --api-key is not given: EDGEINFER_API_KEY."""
    return os.environ.get("EDGEINFER_API_KEY") or None
