"""Running one command or job: errors as one `PROG: error: ...` line, exit codes, deprecations."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import select
import sys
from collections.abc import Callable

from flagsim.console import plain
from flagsim.errors import FlagsimError, Terminated, terminate_like_an_interrupt

log = logging.getLogger(__name__)

#: errno values that mean "this cannot be written here" rather than a missing or unreadable input.
_WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: `cannot write <path>: Read-only file system` and the like."""
    path = exc.filename
    if path is None:  # pyarrow's filesystem names the file in its message only
        m = re.search(r"(?:file|directory) '([^']+)'", str(exc))
        path = m.group(1) if m else None
    if path is not None:  # a Location temp file `.<name>.<hex>.tmp` stands for <name>
        head, tail = os.path.split(os.fsdecode(path))
        m = re.fullmatch(r"\.(.+)\.[0-9a-f]{32}\.tmp", tail)
        path = os.path.join(head, m.group(1)) if m else os.fsdecode(path)
    reason = os.strerror(exc.errno) if exc.errno else (str(exc).splitlines() or [type(exc).__name__])[0]
    if exc.errno in _WRITE_ERRNOS:
        return f"cannot write {path}: {reason}" if path else f"cannot write: {reason}"
    return f"{path}: {reason}" if path else reason


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone; if so stdout is pointed at /dev/null, so that Python's
    own flush at exit does not print a second error."""
    try:  # a pipe whose reader closed polls as an error on its write end
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        closed = any(event & select.POLLERR for _, event in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no real stdout, or no poll (Windows)
        return False
    if closed:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return closed


def run_guarded(
    prog: str, body: Callable[[argparse.Namespace], int | None], args: argparse.Namespace,
    resume: str,
) -> int:
    """Run `body(args)`: its exit code, 2 (or the error's code) after a one-line error, 130 when
    interrupted (`resume` says how to go on). Deprecated spellings in `args` are warned about
    once the body has run, so that an error stays one line."""
    terminate_like_an_interrupt()  # every command, Ray or not: SIGTERM keeps what finished
    try:
        result = body(args)
    except FlagsimError as exc:
        print(f"{prog}: error: {plain(exc)}", file=sys.stderr)
        return exc.exit_code
    except UnicodeEncodeError as exc:  # a path with undecodable bytes (from the command line)
        print(f"{prog}: error: {ascii(exc.object)} is not UTF-8 text; rename it", file=sys.stderr)
        return 2
    except BrokenPipeError as exc:
        if _stdout_closed():  # `flagsim models --json | head`: the reader has what it wanted
            return 128 + 13  # as a process killed by SIGPIPE (a shell's `| head` ignores it)
        print(f"{prog}: error: {plain(os_error_line(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {plain(os_error_line(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{prog}: {'terminated' if terminated else 'interrupted'}; {resume}", file=sys.stderr)
        return 143 if terminated else 130
    for note in getattr(args, "deprecations", None) or ():
        log.warning("%s", note)
    return int(result or 0)
