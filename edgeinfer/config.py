"""Configuration read from the environment, in one place.

Everything else in edgeinfer receives these values as arguments. The Hugging
Face variables (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) are read by
huggingface_hub itself; pip reads its own (PIP_INDEX_URL, PIP_FIND_LINKS, ...).
"""

from __future__ import annotations

import os
from pathlib import Path


def edgeinfer_home() -> Path:
    """The store's folder: EDGEINFER_HOME, else $XDG_DATA_HOME/edgeinfer, else ~/.local/share/edgeinfer."""
    explicit = os.environ.get("EDGEINFER_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "edgeinfer"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks us not to touch the hub at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def history_file() -> Path:
    """Where `edgeinfer chat` keeps its input history across sessions."""
    return edgeinfer_home() / "chat_history"
