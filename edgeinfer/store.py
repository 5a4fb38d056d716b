"""The local model store: where files live, the manifest, checksums, atomic placement."""

# Layout under the store's root:
#
#     manifest.json                 what is here, written atomically under a lock
#     models/<name>/<file>.gguf     catalog models and models registered by `quantize`
#     models/hf.co/<owner>/<repo>/... files pulled by hub reference
#     .partial/<key>/               downloads in progress (resumable); never a final name
#     .locks/                       one lock file per model or output being written
#
# A file reaches its final name only by `os.replace` after its checksum matched and
# after the manifest recorded it, so a reader of the store never sees a partial or
# corrupted model, and a crash leaves a registered file or none. One process at a
# time writes a given model (`Store.exclusive`); another one waits for it.

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeinfer.catalog import check_relative_name
from edgeinfer.errors import ChecksumError, EdgeinferError, InvalidModelError, ResourceError, UsageError

Progress = Callable[[int], None]  # called with the number of bytes just handled

_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    sha256: str
    size: int
    source: str  # where it came from: "hf:owner/repo@rev", "pypi", "quantize:...", ...
    quantization: str = ""
    added: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.models_dir = root / "models"
        self.partial_dir = root / ".partial"
        self.locks_dir = root / ".locks"
        self.manifest_path = root / "manifest.json"
        self.inspect_cache = root / "gguf-metadata-cache.json"
        self.speculation_costs = root / "speculation-costs.json"  # what speculative decoding costs here (costs.CostBook)
        self.batch_costs = root / "batch-costs.json"  # what a batched step costs here (batchcost.BatchCostBook)

    # --- reading ---------------------------------------------------------------

    def entries(self) -> dict[str, StoredModel]:
        """Every entry of the manifest, whether its file is still there or not."""
        unreadable = f"the store manifest {self.manifest_path} is unreadable"
        try:
            raw = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except UnicodeDecodeError as exc:
            raise EdgeinferError(f"{unreadable}: it is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                                 f"at offset {exc.start})") from None
        except OSError as exc:
            raise EdgeinferError(f"{unreadable}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise EdgeinferError(f"{unreadable}: {exc}") from None
        try:
            return _parse_manifest(raw)
        except ValueError as exc:
            raise EdgeinferError(f"the store manifest {self.manifest_path} is damaged: {exc}") from None

    def get(self, name: str) -> StoredModel | None:
        """The entry, if its file is still there."""
        entry = self.entries().get(name)
        if entry is not None and file_present(entry.path):
            return entry
        return None

    def unregistered(self) -> list[StrayFile]:
        """Files in models/ that no manifest entry names: left by an edgeinfer older than the
        register-then-rename order, or put there by hand. Hidden files (work in progress) are not counted."""
        try:
            known = {resolved(entry.path) for entry in self.entries().values()}
        except EdgeinferError:
            known = set()
        strays = []
        for folder, subfolders, files in os.walk(self.models_dir):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder, name)
                if name.startswith(".") or not path.is_file() or resolved(path) in known:
                    continue
                relative = path.relative_to(self.models_dir).as_posix()
                # Named as the manifest would have named it: a hub file by its whole path, others by their folder.
                stray_name = relative if relative.startswith("hf.co/") else Path(relative).parent.as_posix()
                strays.append(StrayFile(stray_name, path, path.stat().st_size))
        return strays

    def size_on_disk(self) -> int:
        total = 0
        for folder, _, files in os.walk(self.root):  # (a folder it cannot read is skipped)
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
        return total

    # --- paths -----------------------------------------------------------------

    def model_path(self, key: str, filename: str) -> Path:
        """The final path of a file; refuses any name that would leave the store."""
        folder = self.models_dir.joinpath(*[check_relative_name(part) for part in key.split("/")])
        path = resolved(folder / check_relative_name(filename))
        if not path.is_relative_to(resolved(self.models_dir)):
            raise EdgeinferError(f"refusing to place {filename!r} outside the store")
        return path

    def staging_dir(self, key: str) -> Path:
        """A per-model folder for resumable partial downloads, outside the models tree."""
        safe = key.replace("/", "--")
        check_relative_name(safe)
        folder = self.partial_dir / safe
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._cannot_write(exc) from None
        return folder

    # --- writing ---------------------------------------------------------------

    def exclusive(self, key: str, on_wait: Callable[[], None] | None = None) -> AbstractContextManager[None]:
        """Hold the lock of one model or output (`key`) while writing it; another process waits here
        (after `on_wait`, to say so) until the holder is done or dead (the kernel drops a dead one's lock)."""
        # Outside .partial/ and models/, whose folders are removed when done: a lock file deleted while
        # held would let a third process lock a new file of the same name.
        lock_file = self.locks_dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        return _holding(self, lock_file, lambda lock: _acquire_waiting(lock, on_wait))

    def place(self, name: str, staged: Path, final: Path, *, sha256: str, source: str, quantization: str = "") -> StoredModel:
        """Give a verified file (`sha256` is the staged file's) its final name, recorded in the manifest.

        The manifest records the file before the rename: killed in between, or stopped by a full disk,
        the store holds an entry whose file is missing (which `pull` fetches again and `rm` forgets),
        never a file it does not know. An earlier file under the final name goes first, so the entry
        never describes a file that is not the one it names.
        """
        try:
            size = staged.stat().st_size
            final.parent.mkdir(parents=True, exist_ok=True)
            final.unlink(missing_ok=True)
        except OSError as exc:
            raise self._cannot_write(exc) from None
        entry = self._record(name, final, sha256=sha256, size=size, source=source, quantization=quantization)
        try:
            os.replace(staged, final)
        except OSError as exc:
            self.forget(name)
            raise self._cannot_write(exc) from None
        return entry

    def register(self, name: str, path: Path, *, sha256: str, source: str, quantization: str = "") -> StoredModel:
        """Record a file that is already where it stays."""
        return self._record(name, path, sha256=sha256, size=path.stat().st_size, source=source, quantization=quantization)

    def _record(self, name: str, path: Path, *, sha256: str, size: int, source: str, quantization: str) -> StoredModel:
        entry = StoredModel(name=name, path=path, sha256=sha256, size=size, source=source, quantization=quantization,
                            added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with self._manifest_lock():
            entries = self.entries()
            entries[name] = entry
            self._write_manifest(entries)
        return entry

    def forget(self, name: str) -> None:
        """Drop an entry from the manifest, leaving any file alone."""
        with self._manifest_lock():
            entries = self.entries()
            if entries.pop(name, None) is not None:
                self._write_manifest(entries)

    def remove_stray(self, stray: StrayFile) -> None:
        """Delete a file of models/ that the manifest does not know (see `unregistered`)."""
        try:
            stray.path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._cannot_write(exc) from None
        self.drop_empty_folders(stray.path.parent)

    def remove(self, name: str) -> StoredModel | None:
        with self._manifest_lock():
            entries = self.entries()
            entry = entries.pop(name, None)
            if entry is None:
                return None
            if resolved(entry.path).is_relative_to(resolved(self.models_dir)):
                try:
                    entry.path.unlink(missing_ok=True)
                except OSError as exc:
                    raise self._cannot_write(exc) from None
                self.drop_empty_folders(entry.path.parent)
            # A file registered where the user put it (quantize --output) is theirs: only forgotten.
            self._write_manifest(entries)
        shutil.rmtree(self.partial_dir / name.replace("/", "--"), ignore_errors=True)
        return entry

    def drop_empty_folders(self, folder: Path) -> None:
        """Remove `folder` and its parents up to the models folder, as long as they are empty."""
        folder, stop = resolved(folder), resolved(self.models_dir)
        while folder != stop and folder.is_relative_to(stop):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def _manifest_lock(self) -> AbstractContextManager[None]:
        return _holding(self, self.root / ".manifest.lock", lambda lock: _acquire_within_a_minute(lock, self.root))

    def _write_manifest(self, entries: dict[str, StoredModel]) -> None:
        payload = {"version": MANIFEST_VERSION, "models": {n: e.to_json() for n, e in sorted(entries.items())}}
        try:
            atomic_write_text(self.manifest_path, json.dumps(payload, indent=2) + "\n")
        except OSError as exc:
            raise self._cannot_write(exc) from None

    def _cannot_write(self, exc: OSError) -> EdgeinferError:
        """An OSError met while writing the store, as the one line a user reads."""
        if full := disk_full_error(exc, self.root):
            return full
        where = Path(exc.filename) if isinstance(exc.filename, str) else self.root
        if blocker := _blocking_file(exc, where):
            return EdgeinferError(f"cannot write to the model store at {self.root}: {blocker} is a file, not a folder")
        inside = f" ({where.relative_to(self.root)})" if where != self.root and where.is_relative_to(self.root) else ""
        return EdgeinferError(f"cannot write to the model store at {self.root}{inside}: {exc.strerror or exc}")


@dataclass(frozen=True)
class StrayFile:
    """A file in models/ without a manifest entry: its file size, and the name its entry would have."""

    name: str
    path: Path
    size: int


MANIFEST_VERSION = 1
_ENTRY_FIELDS = {"name": str, "path": str, "sha256": str, "size": int, "source": str, "quantization": str, "added": str}
_OPTIONAL_FIELDS = {"quantization", "added"}


def _parse_manifest(raw: object) -> dict[str, StoredModel]:
    """The entries of a manifest's JSON; ValueError says what is wrong with it."""
    if not isinstance(raw, dict):
        raise ValueError(f"it holds a JSON {_json_kind(raw)}, not an object")
    version = raw.get("version", MANIFEST_VERSION)
    if version != MANIFEST_VERSION:
        raise ValueError(f"its version is {version!r}; this edgeinfer reads version {MANIFEST_VERSION}")
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise ValueError(f"'models' is a JSON {_json_kind(models)}, not an object")
    return {name: _parse_entry(name, entry) for name, entry in models.items()}


def _parse_entry(name: str, entry: object) -> StoredModel:
    if not isinstance(entry, dict):
        raise ValueError(f"the entry {name!r} is a JSON {_json_kind(entry)}, not an object")
    if unknown := sorted(set(entry) - set(_ENTRY_FIELDS)):
        raise ValueError(f"the entry {name!r} has an unknown field {unknown[0]!r}")
    if missing := [f for f in _ENTRY_FIELDS if f not in entry and f not in _OPTIONAL_FIELDS]:
        raise ValueError(f"the entry {name!r} has no {missing[0]!r}")
    for field, kind in _ENTRY_FIELDS.items():
        value = entry.get(field, "")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"the entry {name!r} has a {field!r} of {value!r}, where a JSON "
                             f"{_json_kind(kind())} belongs")
    if entry["name"] != name:
        raise ValueError(f"the entry {name!r} is named {entry['name']!r}")
    if not entry["path"]:
        raise ValueError(f"the entry {name!r} has an empty 'path'")
    if entry["size"] < 0:
        raise ValueError(f"the entry {name!r} has a 'size' below 0")
    return StoredModel(**{**entry, "path": Path(entry["path"])})


def _json_kind(value: object) -> str:
    kinds = [(bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"), (dict, "object")]
    return next((words for kind, words in kinds if isinstance(value, kind)), "null")


def file_present(path: Path) -> bool:
    """Whether `path` is a file. One that cannot be looked at (a folder without permission on the way,
    where Path.is_file raises) is reported in one line rather than raised."""
    try:
        return path.is_file()
    except OSError as exc:
        raise InvalidModelError(f"cannot read {path}: {exc.strerror or exc}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users of a shared store
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, progress: Progress | None = None) -> str:
    """Check a staged file; a mismatching file is deleted so it cannot be used by mistake."""
    actual = sha256_file(path, progress)
    if actual != expected.lower():
        path.unlink(missing_ok=True)
        raise ChecksumError(f"checksum mismatch for {path.name}: expected sha256 {expected[:12]}…, got {actual[:12]}… (file removed)")
    return actual


def check_free_space(folder: Path, needed: int) -> None:
    """Create `folder` if need be, and make sure `needed` bytes fit on its disk with `free_space_margin` to spare."""
    free, total = _disk_usage(folder)
    if needed + free_space_margin(total) > free:
        raise ResourceError(f"not enough disk space in {folder}: need {_gib(needed)} and "
                            f"{_gib(free_space_margin(total))} to spare, {_gib(free)} free")


def room_for_writing(folder: Path) -> int:
    """How many bytes may be written in `folder` before its disk is within the margin of full."""
    free, total = _disk_usage(folder)
    return max(0, free - free_space_margin(total))


def free_space_margin(disk_size: int) -> int:
    """What a download or a quantization leaves free: the manifest, the metadata cache and everything
    else on that disk still need room after it (5% of the disk, at most 1 GiB)."""
    return min(1 << 30, disk_size // 20)


def _disk_usage(folder: Path) -> tuple[int, int]:
    """The free and total bytes of `folder`'s disk, creating `folder` if need be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(folder)
    except OSError as exc:
        why = f"{blocker} is a file, not a folder" if (blocker := _blocking_file(exc, folder)) else exc.strerror or exc
        raise disk_full_error(exc, folder) or EdgeinferError(f"cannot write to {folder}: {why}") from None
    return usage.free, usage.total


def disk_full_error(exc: OSError, folder: Path) -> ResourceError | None:
    """Turn ENOSPC into our error; anything else stays what it was."""
    if exc.errno == errno.ENOSPC:
        return ResourceError(f"the disk holding {folder} is full; free some space and try again")
    return None


def _blocking_file(exc: OSError, folder: Path) -> Path | None:
    """The file that stands where `folder` or one of its parents should be, if that is why `exc` was raised."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        for path in [folder, *folder.parents]:
            if os.path.lexists(path):
                return None if os.path.isdir(path) else path
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@contextmanager
def _holding(store: Store, lock_file: Path, acquire: Callable[[object], None]) -> Iterator[None]:
    """Hold the file lock `lock_file`, taken by `acquire(lock)`; a store that cannot be written is our error."""
    from filelock import FileLock

    lock = FileLock(str(lock_file))
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        acquire(lock)
    except OSError as exc:
        raise store._cannot_write(exc) from None
    try:
        yield
    finally:
        lock.release()


def _acquire_waiting(lock, on_wait: Callable[[], None] | None) -> None:
    """Take a model's lock, saying so (`on_wait`) before waiting for another process that holds it."""
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()


def _acquire_within_a_minute(lock, root: Path) -> None:
    """Take the manifest's lock; a minute's wait means something is wrong, and the user is told."""
    from filelock import Timeout

    try:
        lock.acquire(timeout=60)
    except Timeout:
        raise EdgeinferError(f"the model store at {root} is busy: another edgeinfer has held its lock "
                             "for a minute; try again when it is done") from None


def resolved(path: Path) -> Path:
    """The path with its links followed; a link loop in the store (`models -> models`) is the user's to mend,
    in one line, not an unexpected error."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError
        raise UsageError(f"{path} runs into a loop of symbolic links; mend the store's folders") from exc
