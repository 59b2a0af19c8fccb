"""A read-only HTTP file server on loopback for browser viewers (neuroglancer reads zarr v3 shards
by byte ranges): GET and HEAD with single byte ranges (``bytes=a-b``, ``bytes=a-``, suffix
``bytes=-n``; 206 with Content-Range, 416 when unsatisfiable), CORS on every answer and an
OPTIONS preflight (with Chrome's private-network header), only files inside the mounted folders
(no listings; ``..``, encoded or not, and links leading out are refused with 403).

Folders are mounted at URL prefixes: the store at ``/``, optionally neuroglancer's bundled
client under another prefix. That client is the build of the neuroglancer Python package, which
subscribes to its Python server's event stream: ``idle_streams`` answer those subscriptions with
an event stream that stays open and silent, so the client shows no reconnection notices.
"""

from __future__ import annotations

import mimetypes
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

HOST = "127.0.0.1"
BLOCK = 1 << 20
"""Bytes per write while a file is sent."""
TYPES = {
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
}
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Content-Range, Content-Length, Accept-Ranges, ETag",
}
PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Max-Age": "86400",
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class Unsatisfiable(ValueError):
    """A byte range that selects no byte of the file (answered with 416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) bytes a ``Range`` header asks of a ``size``-byte file; None
    for the whole file (no header, or one this server ignores: other units, several ranges)."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(size - n, 0), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid: ignored (RFC 9110)
    if start >= size:
        raise Unsatisfiable(header)
    return start, min(int(last), size - 1) if last else size - 1


@dataclass(frozen=True)
class Mount:
    """The folder served under a URL prefix (ending in ``/``); ``index`` answers the prefix."""

    prefix: str
    folder: Path
    index: str | None = None


def resolve(mounts: tuple[Mount, ...], url_path: str) -> Path | None:
    """The file a URL path names inside its mount (longest prefix first); None if it names
    nothing servable; ``PermissionError`` if it would lead out of the mount."""
    path = unquote(urlsplit(url_path).path)
    for mount in sorted(mounts, key=lambda m: len(m.prefix), reverse=True):
        if not path.startswith(mount.prefix):
            continue
        parts = [p for p in path[len(mount.prefix) :].split("/") if p]
        if any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
            raise PermissionError(path)
        root = mount.folder.resolve()
        target = root.joinpath(*parts).resolve()
        if not target.is_relative_to(root):
            raise PermissionError(path)  # a link leading out
        if target.is_dir() and mount.index:
            target = target / mount.index
        return target if target.is_file() else None
    return None


class Handler(BaseHTTPRequestHandler):
    """Answers one connection's requests from the server's mounts."""

    protocol_version = "HTTP/1.1"
    server: FileServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Quiet: a viewer makes thousands of requests."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        with self.server.lock:
            self.server.answered[int(code)] += 1

    def _head(self, status: int, headers: dict[str, str], length: int = 0) -> None:
        self.send_response(status)
        for key, value in {**CORS, **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _error(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self._head(status, {"Content-Type": "text/plain", **(headers or {})}, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_OPTIONS(self) -> None:  # noqa: N802
        asked = self.headers.get("Access-Control-Request-Headers")
        headers = {**PREFLIGHT, "Access-Control-Allow-Headers": asked or "Range"}
        if self.headers.get("Access-Control-Request-Private-Network") == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
        self._head(HTTPStatus.NO_CONTENT, headers)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        if any(path.startswith(prefix) for prefix in self.server.idle_streams):
            return self._idle_stream()
        try:
            target = resolve(self.server.mounts, self.path)
        except PermissionError:
            return self._error(HTTPStatus.FORBIDDEN)
        if target is None:
            return self._error(HTTPStatus.NOT_FOUND)
        try:
            f = target.open("rb")
        except OSError:
            return self._error(HTTPStatus.NOT_FOUND)
        with f:
            size = os.fstat(f.fileno()).st_size
            self._send(f, size, TYPES.get(target.suffix) or _guess(target))

    def _send(self, f, size: int, content_type: str) -> None:
        headers = {
            "Content-Type": content_type,
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache",
        }
        try:
            span = byte_range(self.headers.get("Range"), size)
        except Unsatisfiable:
            return self._error(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"}
            )
        if span is None:
            first, last, status = 0, size - 1, HTTPStatus.OK
        else:
            (first, last), status = span, HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        self._head(status, headers, last - first + 1)
        if self.command == "HEAD":
            return
        f.seek(first)
        left = last - first + 1
        while left > 0:
            data = f.read(min(BLOCK, left))
            if not data:
                break
            self.wfile.write(data)
            left -= len(data)

    def _idle_stream(self) -> None:
        """An event stream that stays open and silent until the server closes."""
        self.send_response(HTTPStatus.OK)
        for key, value in {
            **CORS,
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }.items():
            self.send_header(key, value)
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        while not self.server.closing.wait(15.0):
            self.wfile.write(b": idle\n\n")
            self.wfile.flush()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away mid-answer


def _guess(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


class FileServer(ThreadingHTTPServer):
    """The server: loopback only, a thread per connection, ``close()`` (or ``with``) stops it."""

    daemon_threads = True

    def __init__(
        self, mounts: tuple[Mount, ...], port: int = 0, idle_streams: tuple[str, ...] = ()
    ) -> None:
        self.mounts, self.idle_streams = mounts, idle_streams
        self.closing = threading.Event()
        self.lock, self.answered = threading.Lock(), Counter[int]()
        """Requests answered, by status."""
        super().__init__((HOST, port), Handler)
        self._thread = threading.Thread(target=self.serve_forever, name="tera-view", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    folder: Path, port: int = 0, extra: tuple[Mount, ...] = (), idle_streams: tuple[str, ...] = ()
) -> FileServer:
    """Serve ``folder`` at ``/`` (and ``extra`` mounts) on 127.0.0.1:``port`` (0: a free one)
    from a background thread; the caller closes the returned server."""
    return FileServer((Mount("/", Path(folder)), *extra), port, idle_streams).start()


def wait(server: FileServer, seconds: float | None = None) -> None:
    """Block until ``seconds`` pass (None: until Ctrl-C or ``server.closing`` is set, e.g. by a
    signal handler or another thread), then close the server."""
    try:
        server.closing.wait(seconds)
    finally:
        server.close()
