"""Wait until a Ray head's job API can take a submission (`make submit-*` runs it first)."""

# A head answers /api/version and /api/jobs/ seconds before its node's dashboard agent has
# registered; `ray job submit` in that window fails with "No available agent to submit job" (a
# 500). Ready here means: version and job list answer 200, and the head node in /nodes shows the
# physical stats its agent reports (the agent registers its address before it reports them).
# Standard library only: runs with any python3. Token auth (RAY_AUTH_MODE=token) uses the token
# Ray's CLI would: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("wait_for_ray_jobs")


def _headers() -> dict[str, str]:
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.expanduser().read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get(url: str, headers: dict[str, str], timeout: float) -> tuple[int | None, object, str]:
    """(HTTP status or None, parsed JSON body or None, reason) of one GET."""
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, None, str(getattr(reason, "strerror", None) or reason)
    try:
        return status, json.loads(body), f"HTTP {status}"
    except ValueError:
        return status, None, f"HTTP {status}, not JSON"


def _head_agent_reported(nodes: object) -> bool:
    summary = (nodes or {}).get("data", {}).get("summary", []) if isinstance(nodes, dict) else []
    for node in summary:
        raylet = node.get("raylet", {})
        if raylet.get("isHeadNode") and raylet.get("state") == "ALIVE":
            return "agent" in node or "now" in node
    return False


def check(address: str, timeout: float = 5.0) -> str | None:
    """None when the job API at `address` can take a submission, else what it is still missing."""
    headers = _headers()
    status, body, reason = _get(f"{address}/api/version", headers, timeout)
    if status != 200 or not isinstance(body, dict) or "ray_version" not in body:
        return f"/api/version: {reason}"
    status, _, reason = _get(f"{address}/api/jobs/", headers, timeout)
    if status != 200:
        return f"/api/jobs/: {reason}"
    status, nodes, reason = _get(f"{address}/nodes?view=summary", headers, timeout)
    if status != 200:
        return f"/nodes: {reason}"
    if not _head_agent_reported(nodes):
        return "the head node's job agent has not registered yet"
    return None


def wait(address: str, timeout_s: float, interval_s: float = 1.0) -> str | None:
    """Poll `check` until ready (None) or `timeout_s` passed (the last thing missing)."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        missing = check(address, timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        if missing is None:
            return None
        if time.monotonic() + interval_s > deadline:
            return missing
        if not announced:
            log.info("waiting for the Ray job API at %s (%s)", address, missing)
            announced = True
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address", nargs="?", default=os.environ.get("RAY_ADDRESS"),
                        help="the head's job API, e.g. http://head:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prog = "wait_for_ray_jobs"
    if not args.address:
        print(f"{prog}: error: give the job API address (or set RAY_ADDRESS)", file=sys.stderr)
        return 2
    address = args.address.rstrip("/")
    if address.startswith("ray://"):
        print(f"{prog}: error: {address} is a Ray client address; the job API is "
              "http://HEAD:8265", file=sys.stderr)
        return 2
    if "://" not in address:
        address = f"http://{address}"
    missing = wait(address, args.timeout)
    if missing is not None:
        print(f"{prog}: error: the Ray job API at {address} is not ready after {args.timeout:g} s: "
              f"{missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
