"""The local model store: where files live, the manifest, checksums, atomic placement.

Layout under the store's root:

    manifest.json                 what is here, written atomically under a lock
    models/<name>/<file>.gguf     catalog models and models registered by `quantize`
    models/hf.co/<owner>/<repo>/... files pulled by hub reference
    .partial/<key>/               downloads in progress (resumable); never a final name

A file reaches its final name only by `os.replace` after its checksum matched,
so a reader of the store never sees a partial or corrupted model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeinfer.catalog import check_relative_name
from edgeinfer.errors import ChecksumError, EdgeinferError, ResourceError

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
        self.manifest_path = root / "manifest.json"
        self.inspect_cache = root / "gguf-metadata-cache.json"
        self.speculation_costs = root / "speculation-costs.json"  # what speculative decoding costs here (costs.CostBook)

    # --- reading ---------------------------------------------------------------

    def entries(self) -> dict[str, StoredModel]:
        if not self.manifest_path.is_file():
            return {}
        try:
            raw = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EdgeinferError(f"the store manifest {self.manifest_path} is unreadable: {exc}") from None
        return {name: StoredModel(**{**e, "path": Path(e["path"])}) for name, e in raw.get("models", {}).items()}

    def get(self, name: str) -> StoredModel | None:
        entry = self.entries().get(name)
        if entry is not None and entry.path.is_file():
            return entry
        return None

    def size_on_disk(self) -> int:
        if not self.root.exists():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    # --- paths -----------------------------------------------------------------

    def model_path(self, key: str, filename: str) -> Path:
        """The final path of a file; refuses any name that would leave the store."""
        folder = self.models_dir.joinpath(*[check_relative_name(part) for part in key.split("/")])
        path = (folder / check_relative_name(filename)).resolve()
        if not path.is_relative_to(self.models_dir.resolve()):
            raise EdgeinferError(f"refusing to place {filename!r} outside the store")
        return path

    def staging_dir(self, key: str) -> Path:
        """A per-model folder for resumable partial downloads, outside the models tree."""
        safe = key.replace("/", "--")
        check_relative_name(safe)
        folder = self.partial_dir / safe
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --- writing ---------------------------------------------------------------

    def place(self, name: str, staged: Path, final: Path, *, sha256: str, source: str, quantization: str = "") -> StoredModel:
        """Move a verified file to its final name and record it in the manifest."""
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        return self.register(name, final, sha256=sha256, source=source, quantization=quantization)

    def register(self, name: str, path: Path, *, sha256: str, source: str, quantization: str = "") -> StoredModel:
        entry = StoredModel(
            name=name,
            path=path,
            sha256=sha256,
            size=path.stat().st_size,
            source=source,
            quantization=quantization,
            added=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        with self._manifest_lock():
            entries = self.entries()
            entries[name] = entry
            self._write_manifest(entries)
        return entry

    def remove(self, name: str) -> StoredModel | None:
        with self._manifest_lock():
            entries = self.entries()
            entry = entries.pop(name, None)
            if entry is None:
                return None
            if entry.path.resolve().is_relative_to(self.models_dir.resolve()):
                entry.path.unlink(missing_ok=True)
                _remove_empty_parents(entry.path.parent, stop=self.models_dir)
            # A file registered where the user put it (quantize --output) is theirs: only forgotten.
            self._write_manifest(entries)
        shutil.rmtree(self.partial_dir / name.replace("/", "--"), ignore_errors=True)
        return entry

    @contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".manifest.lock"), timeout=60):
            yield

    def _write_manifest(self, entries: dict[str, StoredModel]) -> None:
        payload = {"version": 1, "models": {n: e.to_json() for n, e in sorted(entries.items())}}
        atomic_write_text(self.manifest_path, json.dumps(payload, indent=2) + "\n")


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


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
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ResourceError(f"not enough disk space in {folder}: need {_gib(needed)}, {_gib(free)} free")


def disk_full_error(exc: OSError, folder: Path) -> ResourceError | None:
    """Turn ENOSPC into our error; anything else stays what it was."""
    if exc.errno == errno.ENOSPC:
        return ResourceError(f"the disk holding {folder} is full; free some space and try again")
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
