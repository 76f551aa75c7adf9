"""scripts/wait_for_ray_jobs.py against a real HTTP server on 127.0.0.1 that plays a starting head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rayhead import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "wait_for_ray_jobs.py"

HEAD = {"raylet": {"isHeadNode": True, "state": "ALIVE"}}


@contextmanager
def fake_head(agent_after: int | None, token: str | None = None) -> Iterator[str]:
    """A job API: /api/version and /api/jobs/ answer at once; the head node's agent stats appear in
    /nodes from its `agent_after`-th request on (never when None)."""
    seen = {"nodes": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                return self._send(401, {"msg": "Unauthorized"})
            if self.path == "/api/version":
                return self._send(200, {"version": "4", "ray_version": "2.60.0"})
            if self.path == "/api/jobs/":
                return self._send(200, [])
            if self.path == "/nodes?view=summary":
                seen["nodes"] += 1
                ready = agent_after is not None and seen["nodes"] >= agent_after
                node = {**HEAD, "now": 1.0, "agent": {}} if ready else HEAD
                return self._send(200, {"result": True, "data": {"summary": [node]}})
            return self._send(404, {})

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _wait(address: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_A")}
    return subprocess.run([sys.executable, str(SCRIPT), address, "--timeout", str(timeout)],
                          env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_waits_for_the_head_nodes_agent() -> None:
    with fake_head(agent_after=3) as url:
        proc = _wait(url, 60)
    assert proc.returncode == 0, proc.stderr
    assert "has not registered yet" in proc.stderr  # it did wait for the agent


def test_gives_up_in_one_line_when_the_agent_never_registers() -> None:
    with fake_head(agent_after=None) as url:
        proc = _wait(url, 2)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"wait_for_ray_jobs: error: the Ray job API at {url} is not ready after 2 s: "
        "the head node's job agent has not registered yet")


def test_nothing_listening_is_one_line() -> None:
    address = f"127.0.0.1:{free_port()}"
    proc = _wait(address, 1)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"wait_for_ray_jobs: error: the Ray job API at http://{address} is not "
                           "ready after 1 s: /api/version: ")


def test_sends_the_token_when_token_auth_is_on(tmp_path: Path) -> None:
    token_file = tmp_path / "auth_token"
    token_file.write_text("s3cret\n")
    with fake_head(agent_after=1, token="s3cret") as url:
        denied = _wait(url, 1)
        ok = _wait(url, 30, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    assert denied.returncode == 1 and "/api/version: HTTP 401" in denied.stderr
    assert ok.returncode == 0, ok.stderr
