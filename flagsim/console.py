"""Console output: rich consoles sized for terminals or pipes, and safe display of untrusted text."""

from __future__ import annotations

import logging
import re
import sys
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

#: Width of a console that does not write to a terminal (a pipe, a file, CI): wide enough that
#: rich never wraps a line or cuts a table cell, while tables stay as narrow as their content.
PIPE_WIDTH = 10_000

#: C0 controls (newline and tab included), DEL, C1 controls (NEL, U+0085, among them), the
#: Unicode line and paragraph separators (U+2028, U+2029: a line break in a terminal, a log, and
#: a crash in Pillow's text layout), and the bidirectional marks, overrides and isolates that
#: can make a name display as something else.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def plain(text: Any) -> str:
    """`text` with every control character written as a visible escape (`\\x1b`, `\\u202e`).

    For untrusted text (image names, paths, messages that quote them) shown on a terminal, in
    a log or in HTML: an escape sequence or a NUL in a name is displayed, never executed.
    """
    return _UNSAFE.sub(_visible, str(text))


def _visible(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(text: Any) -> str:
    """`text` for rich output: control characters made visible and rich markup escaped, so a
    name such as `[link=https://x]click[/link]` prints literally."""
    from rich.markup import escape

    return escape(plain(text))


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def make_console(stderr: bool = False) -> Console:
    """A rich Console on stdout (or stderr): the terminal's width on a terminal, else one line
    per line of output (no wrapping, no cut table cells) and no colours."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if is_terminal(stream):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


def stdout_console() -> Console:
    """The console commands print their tables and results on."""
    return make_console(stderr=False)


def stderr_console() -> Console:
    """The console for logs and progress bars."""
    return make_console(stderr=True)


class SafeFormatter(logging.Formatter):
    """A formatter whose messages show control characters as escapes (see `plain`); a
    traceback appended to a record keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = plain(record.message)
        return super().formatMessage(record)


def log_handler(verbose: int = 0) -> logging.Handler:
    """A rich handler on a terminal; on a pipe, plain `LEVEL message` lines that never wrap."""
    if is_terminal(sys.stderr):
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            show_path=False, rich_tracebacks=False, console=stderr_console()
        )
        handler.setFormatter(SafeFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose > 1 else (
            "%(asctime)s %(levelname)s %(message)s")
        handler.setFormatter(SafeFormatter(fmt, datefmt="%H:%M:%S"))
    return handler
