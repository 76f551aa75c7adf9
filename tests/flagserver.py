"""A real HTTP server on 127.0.0.1 that serves the flags-page fixture and scriptable flag PNGs."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from flagsim.images import bundled_flags_dir

FIXTURE = Path(__file__).parent / "fixtures" / "flags_page.html"
PAGE_PATH = "/wiki/List_of_national_flags_of_sovereign_states"

#: Commons file name in the fixture -> bundled PNG stem the server answers with.
FILE_MAP = {
    "Flag_of_Afghanistan_(2013–2021).svg": "Afghanistan",
    "Flag_of_the_Taliban.svg": "Saudi_Arabia",
    "Flag_of_Albania.svg": "Albania",
    "Flag_of_the_Bahamas.svg": "The_Bahamas",
    "Flag_of_Chad.svg": "Chad",
    "Flag_of_Denmark.svg": "Denmarki",
    "Flag_of_Guinea.svg": "Guinea",
    "Flag_of_Ireland.svg": "Ireland",
    "Flag_of_Italy.svg": "Italy",
    "Flag_of_Côte_d'Ivoire.svg": "Ivory_Coast",
    "Flag_of_Japan.svg": "Japan",
    "Flag_of_Mali.svg": "Mali",
    "Flag_of_Nauru.svg": "Nauru",
    "Flag_of_Nepal.svg": "Nepal",
    "Flag_of_New_Zealand.svg": "New_Zealand",
    "Flag_of_Peru.svg": "Peru",
    "Flag_of_Romania.svg": "Romania",
    "Flag_of_Sao_Tome_and_Principe.svg": "São_Tomé_and_Príncipe",
    "Flag_of_Test_Slash_Republic.svg": "Mauritius",
    "Flag_of_Dot_Land.svg": "Bhutan",
    "Flag_of_the_Vatican_City.svg": "Vatican_City",
    "Flag_of_Kosovo.svg": "Kosovo",
    "Flag_of_the_Turkish_Republic_of_Northern_Cyprus.svg": "Turkey",
    "Flag_of_the_Republic_of_China.svg": "Taiwan",
}

_THUMB_RE = re.compile(
    r"^/wikipedia/commons/thumb/[0-9a-f]/[0-9a-f]{2}/([^/]+)/(\d+)px-([^/]+)\.png$"
)


@dataclass(frozen=True)
class Reply:
    """One scripted answer. body=None serves the mapped PNG; `truncate` keeps that many bytes.

    `trickle` > 0 sends the body one byte at a time, that many seconds apart.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    delay: float = 0.0
    truncate: int | None = None
    content_length: bool = True
    content_type: str = "image/png"
    trickle: float = 0.0


@dataclass(frozen=True)
class Hit:
    path: str  # percent-decoded request path (no query)
    query: str
    headers: dict[str, str]
    t: float  # time.monotonic() when the request arrived


def bundled_png(stem: str) -> Path:
    return bundled_flags_dir() / "images" / f"{stem}.png"


class _Server(ThreadingHTTPServer):
    # http.server's default listen backlog is 5: with 8 concurrent clients on a loaded machine
    # the kernel drops SYNs and the client's connect times out before the request is seen.
    request_queue_size = 128


class FlagServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port>; see `script()` and `hits`."""

    def __init__(self, html: str | None = None) -> None:
        self.html = FIXTURE.read_text(encoding="utf-8") if html is None else html
        self._scripts: dict[str, list[Reply]] = {}
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.page_url = self.base + PAGE_PATH
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FlagServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- scripting and request log ------------------------------------------------------
    def script(self, file_name: str, *replies: Reply) -> None:
        """Answer the next requests for `file_name` (a Commons file name or a path) in order."""
        with self._lock:
            self._scripts[file_name] = list(replies)

    def clear(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._hits.clear()

    @property
    def hits(self) -> list[Hit]:
        with self._lock:
            return list(self._hits)

    def hits_for(self, file_name: str) -> list[Hit]:
        return [h for h in self.hits if file_name in h.path]

    def flag_hits(self) -> list[Hit]:
        return [h for h in self.hits if h.path.startswith(("/wikipedia/", "/files/"))]

    def _next_reply(self, key: str) -> Reply | None:
        with self._lock:
            queue = self._scripts.get(key)
            return queue.pop(0) if queue else None

    def _record(self, hit: Hit) -> None:
        with self._lock:
            self._hits.append(hit)

    def served_html(self) -> bytes:
        return self.html.replace("//upload.wikimedia.org/", f"//127.0.0.1:{self.port}/").encode()


def _handler(server: FlagServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            server._record(Hit(path, parts.query, dict(self.headers.items()), time.monotonic()))
            try:
                self._answer(path)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeouts, size limits)

        def _answer(self, path: str) -> None:
            if path == PAGE_PATH:
                self._send(200, server.served_html(), "text/html; charset=UTF-8")
                return
            m = _THUMB_RE.match(path)
            if path.startswith("/files/"):
                key, file = path, bundled_png(path[len("/files/") :].removesuffix(".png"))
            elif m and m.group(1) == m.group(3):
                key = m.group(1)
                stem = FILE_MAP.get(key)
                file = bundled_png(stem) if stem else None
            else:
                self._send(404, b"not found", "text/plain")
                return
            reply = server._next_reply(key) or Reply()
            if reply.delay:
                time.sleep(reply.delay)
            if reply.body is not None:
                body = reply.body
            elif file is not None and file.exists():
                body = file.read_bytes()
            else:
                self._send(404, b"no such file", "text/plain")
                return
            if reply.truncate is not None:
                body = body[: reply.truncate]
            self._send(
                reply.status, body, reply.content_type, reply.headers, reply.content_length,
                reply.trickle,
            )

        def _send(
            self,
            status: int,
            body: bytes,
            ctype: str,
            headers: dict[str, str] | None = None,
            content_length: bool = True,
            trickle: float = 0.0,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if content_length:
                self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not trickle:
                self.wfile.write(body)
                return
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(trickle)

    return Handler


@contextmanager
def flag_server(html: str | None = None) -> Iterator[FlagServer]:
    server = FlagServer(html).start()
    try:
        yield server
    finally:
        server.stop()
