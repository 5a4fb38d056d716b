"""Model references, what a user types wherever a command takes a model, parsed here and only here
into a few small dataclasses; turning one into a file on disk is `edgeinfer.library.locate`'s job."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.catalog import HUB_REPO, Catalog, ModelSpec, check_relative_name
from edgeinfer.errors import ModelNotFoundError, UsageError


@dataclass(frozen=True)
class CatalogRef:
    spec: ModelSpec


@dataclass(frozen=True)
class NameRef:
    """A bare name the catalog does not know: perhaps a model registered in the store."""

    name: str


@dataclass(frozen=True)
class HubFileRef:
    repo: str
    file: str
    revision: str = "main"


@dataclass(frozen=True)
class HubQuantRef:
    """OWNER/REPO:QUANT: the repository's .gguf file whose name carries QUANT."""

    repo: str
    quant: str
    revision: str = "main"


@dataclass(frozen=True)
class LocalRef:
    path: Path


Reference = CatalogRef | NameRef | HubFileRef | HubQuantRef | LocalRef

_HUB_QUANT = re.compile(rf"^(?P<repo>{HUB_REPO}):(?P<quant>[A-Za-z0-9_.-]+)$")
_HUB_FILE = re.compile(rf"^(?P<repo>{HUB_REPO})/(?P<file>.+\.gguf)$", re.IGNORECASE)
_HUB_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")


def parse_reference(text: str, catalog: Catalog, stored: Callable[[], Iterable[str]] = tuple) -> Reference:
    """Read a model reference: catalog name, hub reference, or local .gguf path. A bare name in another
    case than its model's is that model when it matches only one (`stored` gives the store's names; it
    is asked only then, so a damaged manifest troubles no other reference)."""
    text = text.strip()
    if not text:
        raise UsageError("empty model reference")
    if text in catalog.models:
        return CatalogRef(catalog.models[text])
    path = _expand_user(text)
    if text.lower().endswith(".gguf") and (_on_disk(path) or text.startswith((".", "/", "~"))):
        return LocalRef(path)
    stripped = strip_hub_prefix(text)
    if m := _HUB_QUANT.match(stripped):
        return HubQuantRef(m["repo"], m["quant"])
    if m := _HUB_FILE.match(stripped):
        return HubFileRef(m["repo"], check_relative_name(m["file"]))
    if "/" in text or text.lower().endswith(".gguf"):
        raise ModelNotFoundError(
            f"'{text}' is neither a file on disk nor a hub reference (OWNER/REPO:QUANT or OWNER/REPO/FILE.gguf)"
        )
    return _named(text, catalog, stored)


def _named(text: str, catalog: Catalog, stored: Callable[[], Iterable[str]]) -> CatalogRef | NameRef:
    """A bare name, taken as the one catalog or store name it equals ignoring case (SmolLM2-135M-Instruct
    for smollm2-135m-instruct); an exact store name, or one that matches none or several, as it is."""
    names = set(stored())
    if text in names:
        return NameRef(text)
    matches = {n for n in [*catalog.models, *names] if n.lower() == text.lower()}
    if len(matches) != 1:
        return NameRef(text)
    name = matches.pop()
    return CatalogRef(catalog.models[name]) if name in catalog.models else NameRef(name)


def _expand_user(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~someone who has no home here: a path that names nothing
        return Path(text)


# What stat() says of a path that is not there (Path.exists answers False to only some of these,
# and raises the rest, PermissionError included).
_ABSENT = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL}


def _on_disk(path: Path) -> bool:
    """Whether something is at `path`, as far as one can tell: a path that cannot be looked into
    (a folder without permission) counts as there, and reading it will say why it fails."""
    try:
        path.stat()
    except OSError as exc:
        return exc.errno not in _ABSENT
    except ValueError:  # a NUL byte in the name
        return False
    return True


def strip_hub_prefix(text: str) -> str:
    """OWNER/NAME... from a reference that may be written as a hub address (https://huggingface.co/OWNER/NAME...)."""
    for prefix in _HUB_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text
