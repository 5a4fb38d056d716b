"""A small stand-in for the Hugging Face hub, served on 127.0.0.1 for tests.

It answers what huggingface_hub 2.4 asks when edgeinfer pulls a file:

- HEAD /{owner}/{repo}/resolve/{revision}/{path}: the file's metadata. For an LFS
  file the hub sends its sha256 as ETag and X-Linked-Etag, the size as
  X-Linked-Size, and the commit as X-Repo-Commit (huggingface_hub refuses a
  response without it). No X-Xet-* header is ever sent, so downloads are plain HTTP.
- GET of the same URL: the bytes, honouring `Range: bytes=N-` with 206.
- GET /api/models/{owner}/{repo}/tree/{revision}[/{folder}]?recursive=...: the
  listing behind `HfApi().list_repo_files`.
- 404s carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound,
  EntryNotFound), which huggingface_hub turns into its own exception classes.

Faults a test can ask for: cut the connection once partway through a file, serve
other bytes than the ones the headers describe, stop partway through a file
until the test releases it (to kill a client in the middle of a download), send
a body without end after announcing the file's size, or trickle a file out one
byte at a time.
Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_CHUNK = 64 * 1024


@dataclass
class HubFile:
    content: bytes
    lfs: bool = True  # LFS files publish their sha256; small git files only a git blob id
    served: bytes | None = None  # what GET actually sends, when it differs from `content`

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()


@dataclass
class Pause:
    """Stop sending a file at `offset` until `release` is set; `reached` tells the test it got there."""

    offset: int
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None = None


class HubServer:
    """Use as a context manager; `url` is what HF_ENDPOINT should be set to."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.requests: list[Request] = []
        self.bytes_sent: dict[tuple[str, str], int] = {}
        self._cuts: dict[tuple[str, str], int] = {}
        self._pauses: dict[tuple[str, str], Pause] = {}
        self._lock = threading.Lock()
        self.cdn = False  # LFS files are served from another host, as the hub's CDN serves them
        self._endless: set[tuple[str, str]] = set()
        self._trickles: dict[tuple[str, str], float] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for pause in self._pauses.values():
            pause.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- what the test sets up ---------------------------------------------------

    def add_repo(self, repo: str) -> None:
        self.repos.setdefault(repo, {})

    def add_file(self, repo: str, path: str, content: bytes, *, lfs: bool = True) -> HubFile:
        entry = HubFile(content, lfs=lfs)
        self.repos.setdefault(repo, {})[path] = entry
        return entry

    def serve_wrong_bytes(self, repo: str, path: str) -> None:
        """Headers keep promising the real sha256; the body has one byte flipped in the middle."""
        entry = self.repos[repo][path]
        body = bytearray(entry.content)
        body[len(body) // 2] ^= 0xFF
        entry.served = bytes(body)

    def cut_once(self, repo: str, path: str, after: int) -> None:
        """The next GET of this file closes the connection after `after` bytes of the body."""
        self._cuts[(repo, path)] = after

    def pause_at(self, repo: str, path: str, offset: int) -> Pause:
        pause = Pause(offset)
        self._pauses[(repo, path)] = pause
        return pause

    def serve_endlessly(self, repo: str, path: str) -> None:
        """HEAD still announces the file's size; GET sends its bytes, then zeros until the client hangs up
        (no Content-Length: the body ends when the connection does)."""
        self._endless.add((repo, path))

    def trickle(self, repo: str, path: str, every: float) -> None:
        """GET sends the file one byte every `every` seconds."""
        self._trickles[(repo, path)] = every

    def serve_lfs_from_a_cdn(self) -> None:
        """Answer LFS files with a redirect to another host name (localhost), as the hub does (cdn-lfs...)."""
        self.cdn = True

    def gets(self, path_part: str = "/resolve/") -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and path_part in r.path]

    # --- what the handler asks ---------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_cut(self, key: tuple[str, str]) -> int | None:
        with self._lock:
            return self._cuts.pop(key, None)

    def _count(self, key: tuple[str, str], n: int) -> None:
        with self._lock:
            self.bytes_sent[key] = self.bytes_sent.get(key, 0) + n


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<path>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<folder>.*))?$")


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # keep the test output clean
            pass

        def do_HEAD(self) -> None:
            self._route(send_body=False)

        def do_GET(self) -> None:
            self._route(send_body=True)

        def _route(self, send_body: bool) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            hub._record(Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
            if (m := _RESOLVE.match(path)) and hub.cdn and hub.repos.get(m["repo"], {}).get(m["path"], HubFile(b"", lfs=False)).lfs:
                self._redirect(m["repo"], m["path"])
            elif m := _CDN.match(path):
                self._resolve(m["repo"], "main", m["path"], send_body)
            elif m := _RESOLVE.match(path):
                self._resolve(m["repo"], unquote(m["rev"]), m["path"], send_body)
            elif (m := _TREE.match(path)) and send_body:
                recursive = parse_qs(parts.query).get("recursive", ["false"])[0].lower() == "true"
                self._tree(m["repo"], unquote(m["rev"]), (m["folder"] or "").strip("/"), recursive)
            else:
                self._error(404, None, "Not found")

        # --- /resolve ----------------------------------------------------------

        def _redirect(self, repo: str, path: str) -> None:
            entry = hub.repos[repo][path]
            port = hub._httpd.server_address[1]
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/cdn/{repo}/{path}")
            self.send_header("ETag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Size", str(len(entry.content)))
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _resolve(self, repo: str, revision: str, path: str, send_body: bool) -> None:
            files = self._repo_files(repo, revision)
            if files is None:
                return
            entry = files.get(path)
            if entry is None:
                self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit=True)
                return
            body = entry.served if entry.served is not None else entry.content
            start, status = 0, 200
            wanted = self.headers.get("Range") if send_body else None
            if wanted and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())):
                start = int(m[1])
                end = int(m[2]) + 1 if m[2] else len(body)
                if start >= len(body):
                    self._error(416, None, "Range not satisfiable")
                    return
                status = 206
                body = body[start:end]
            self.send_response(status)
            etag = entry.sha256 if entry.lfs else entry.blob_id
            self.send_header("ETag", f'"{etag}"')
            if entry.lfs:
                self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
                self.send_header("X-Linked-Size", str(len(entry.content)))
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            endless = send_body and (repo, path) in hub._endless
            if endless:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(entry.content)}")
            self.end_headers()
            if send_body:
                self._send_body(repo, path, body, start, endless)

        def _send_body(self, repo: str, path: str, body: bytes, start: int, endless: bool = False) -> None:
            key = (repo, path)
            cut = hub._take_cut(key)
            pause = hub._pauses.get(key)
            every = hub._trickles.get(key)
            sent = 0
            try:
                while sent < len(body):
                    chunk = body[sent : sent + (1 if every else _CHUNK)]
                    if every:
                        time.sleep(every)
                    if cut is not None and sent + len(chunk) > cut:
                        chunk = chunk[: max(cut - sent, 0)]
                        self.wfile.write(chunk)
                        hub._count(key, len(chunk))
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # the cable is pulled: no more bytes, no clean end
                        return
                    if pause is not None and start + sent >= pause.offset and not pause.release.is_set():
                        self.wfile.flush()
                        pause.reached.set()
                        pause.release.wait()
                    self.wfile.write(chunk)
                    hub._count(key, len(chunk))
                    sent += len(chunk)
                while endless:  # until the client hangs up
                    self.wfile.write(bytes(_CHUNK))
                    hub._count(key, _CHUNK)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.close_connection = True

        # --- /api/models/.../tree ---------------------------------------------

        def _tree(self, repo: str, revision: str, folder: str, recursive: bool) -> None:
            files = self._repo_files(repo, revision)
            if files is None:
                return
            prefix = f"{folder}/" if folder else ""
            entries: dict[str, dict] = {}
            for path, entry in sorted(files.items()):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix) :]
                if "/" in rest and not recursive:
                    sub = prefix + rest.split("/", 1)[0]
                    entries[sub] = {"type": "directory", "oid": "0" * 40, "size": 0, "path": sub}
                    continue
                if recursive:
                    for i, part in enumerate(rest.split("/")[:-1]):
                        sub = prefix + "/".join(rest.split("/")[: i + 1])
                        entries.setdefault(sub, {"type": "directory", "oid": "0" * 40, "size": 0, "path": sub})
                item = {"type": "file", "oid": entry.blob_id, "size": len(entry.content), "path": path}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": len(entry.content), "pointerSize": 134}
                entries[path] = item
            payload = json.dumps(list(entries.values())).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        # --- errors --------------------------------------------------------------

        def _repo_files(self, repo: str, revision: str) -> dict[str, HubFile] | None:
            files = hub.repos.get(repo)
            if files is None:
                # The hub answers 401 for a repository that does not exist (or that a token would show).
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            if revision not in ("main", COMMIT):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return files

        def _error(self, status: int, code: str | None, message: str, commit: bool = False) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler
