"""One writer per run directory: an exclusive RUN/_lock.json naming its holder, stale locks taken over."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flagsim.errors import FlagsimError
from flagsim.storage import Location

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
_READ_TRIES = 20  # a lock just created may not hold its JSON yet: re-read it this many times
_READ_PAUSE_S = 0.05
_WAIT_PAUSE_S = 0.1  # between looks at a lock `run_lock(wait_for=...)` waits for


class RunLockedError(FlagsimError):
    """Another process (or this one, nested) holds the run directory's lock."""


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, as psutil reports), None if unknown."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with Ray
        return None
    try:
        return round(float(psutil.Process(pid).create_time()), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (zombies count as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:  # pragma: no cover
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _holder_record(what: str) -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": process_start_time(os.getpid()),
        "command": what,
        "time": now,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
        "token": uuid.uuid4().hex,
    }


def _since(record: dict[str, Any]) -> str:
    """The holder's start as HH:MM:SS (local time), with the date when it was not today."""
    try:
        t = time.localtime(float(record["time"]))
    except (KeyError, TypeError, ValueError):
        return "an unknown time"
    today = time.localtime()
    same_day = (t.tm_year, t.tm_yday) == (today.tm_year, today.tm_yday)
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", t)


def _stale_reason(record: dict[str, Any]) -> str | None:
    """Why the lock's holder is certainly gone (same host only), or None when it may be alive."""
    if record.get("host") != socket.gethostname():
        return None  # another machine: its processes cannot be seen from here
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    if not pid_alive(pid):
        return f"pid {pid} is not running"
    recorded, actual = record.get("start_time"), process_start_time(pid)
    if recorded is not None and actual is not None and abs(float(recorded) - actual) > 1.0:
        return f"pid {pid} is now another process (started later than the lock's holder)"
    return None


def _in_use(run_root: Location, lock: Location, record: dict[str, Any]) -> RunLockedError:
    return RunLockedError(
        f"run directory {run_root} is in use by '{record.get('command', '?')}' "
        f"(pid {record.get('pid', '?')} on host {record.get('host', '?')} since {_since(record)}); "
        f"wait for it or remove {lock} if that process is gone"
    )


def in_use_by(run_root: Location) -> str | None:
    """Who holds the run's lock now ("'flagsim embed' (pid 123 on host h since 12:00:01)"), or
    None when nobody does (no lock, or a stale one). For messages: it takes nothing."""
    lock = run_root / LOCK_FILE
    if not lock.exists():
        return None
    record = _read_record(lock)
    if not record or _stale_reason(record):
        return None
    return (f"'{record.get('command', '?')}' (pid {record.get('pid', '?')} on host "
            f"{record.get('host', '?')} since {_since(record)})")


def _read_record(lock: Location) -> dict[str, Any] | None:
    """The lock's JSON; None when it vanished; {} when it stays unreadable (a torn write)."""
    for attempt in range(_READ_TRIES):
        try:
            data = json.loads(lock.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # not yet written (create and write are two steps)
            if not lock.exists():
                return None
            data = None
        if isinstance(data, dict):
            return data
        if attempt + 1 < _READ_TRIES:
            time.sleep(_READ_PAUSE_S)
    return {}


def _create_local(lock: Location, record: dict[str, Any]) -> bool:
    """Create `lock` holding `record` if absent (O_CREAT|O_EXCL); False when it exists."""
    lock.parent.mkdirs()
    try:
        fd = os.open(lock.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _create_remote(lock: Location, record: dict[str, Any]) -> bool:
    """Best-effort create-if-absent on an object store (no conditional PUT through pyarrow):
    check, PUT, read back; of two writers racing here the later PUT wins and the earlier one
    sees the other's token and backs off. Two that both read back their own (PUTs more than
    one round trip apart but both after the other's check) can still both proceed."""
    if lock.exists():
        return False
    lock.write_json(record)
    back = _read_record(lock)
    return bool(back) and back.get("token") == record["token"]


def _remove_stale(lock: Location, seen: dict[str, Any]) -> None:
    """Remove the stale lock `seen`, unless another process replaced it meanwhile."""
    if not lock.is_local:
        current = _read_record(lock)
        if current is not None and current.get("token") == seen.get("token"):
            lock.delete()
        return
    aside = f"{lock.parent.path}/.{lock.name}.{uuid.uuid4().hex}.stale"
    try:
        os.rename(lock.path, aside)  # atomic: exactly one taker moves a given file aside
    except FileNotFoundError:
        return
    try:
        with open(aside, "rb") as f:
            moved = json.loads(f.read().decode("utf-8") or "{}")
    except (OSError, ValueError):
        moved = {}
    if isinstance(moved, dict) and moved.get("token") != seen.get("token"):
        # someone took the stale lock over between our read and the rename: put theirs back
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock.path)
    os.unlink(aside)


def _acquire(run_root: Location, what: str, wait_for: str | None = None, wait_s: float = 0.0
             ) -> tuple[Location, dict[str, Any]]:
    lock = run_root / LOCK_FILE
    record = _holder_record(what)
    create = _create_local if lock.is_local else _create_remote
    deadline = time.monotonic() + wait_s
    changes = 0
    while changes < 10:  # each pass takes the lock, fails, waits, or sees it change hands
        if create(lock, record):
            return lock, record
        held = _read_record(lock)
        if held is None:
            changes += 1
            continue  # released meanwhile: try again
        if not held:
            raise RunLockedError(
                f"run directory {run_root} has an unreadable lock {lock}; remove it if no flagsim "
                "command is using that run"
            )
        if held.get("host") == record["host"] and held.get("pid") == record["pid"] and (
            held.get("start_time") == record["start_time"]
        ):
            raise RunLockedError(
                f"run directory {run_root} is already locked by this process for "
                f"'{held.get('command', '?')}' (since {_since(held)}); '{what}' cannot lock it "
                "again inside it"
            )
        reason = _stale_reason(held)
        if reason is None:
            if wait_for and str(held.get("command", "")).startswith(wait_for) \
                    and time.monotonic() < deadline:
                time.sleep(_WAIT_PAUSE_S)  # a sibling's short write: wait for it
                continue
            raise _in_use(run_root, lock, held)
        log.warning("taking over the stale lock %s of '%s' (%s)", lock, held.get("command", "?"),
                    reason)
        _remove_stale(lock, held)
        changes += 1
    raise RunLockedError(f"could not lock run directory {run_root}: {lock} keeps changing")


def _release(lock: Location, record: dict[str, Any]) -> None:
    current = _read_record(lock)
    if current is None:
        log.warning("%s was removed while '%s' held it", lock, record["command"])
        return
    if current.get("token") != record["token"]:
        log.warning("%s now belongs to another process (%s, pid %s); leaving it", lock,
                    current.get("command", "?"), current.get("pid", "?"))
        return
    lock.delete()


@contextlib.contextmanager
def run_lock(run_root: Location, what: str, wait_for: str | None = None, wait_s: float = 0.0
             ) -> Iterator[Location]:
    """Hold RUN/_lock.json for the block: the one process writing to `run_root` is `what`.

    A second holder fails at once with RunLockedError naming the holder, except that while the
    holder's command starts with `wait_for` (a sibling of the same kind: the index builds of
    one command, each committing its own files) it waits for it, up to `wait_s` seconds; a lock left by a dead
    process on this host (its pid gone, or reused by a later process) is logged and taken over;
    a nested acquire by the same process fails too. The lock is removed when the block exits,
    on exceptions and KeyboardInterrupt included. Local disks create it with O_CREAT|O_EXCL;
    object stores only best-effort (see `_create_remote`). Yields the lock's location.
    """
    lock, record = _acquire(run_root, what, wait_for, wait_s)
    log.debug("locked %s for '%s'", lock, what)
    try:
        yield lock
    finally:
        _release(lock, record)
