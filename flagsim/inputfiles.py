"""Open user input files safely: regular files only; CSVs streamed with one-line errors."""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

from flagsim.errors import DataError
from flagsim.storage import Location

#: Largest CSV field (and physical line) read, in bytes; the csv module's default is 128 KiB.
FIELD_LIMIT = 16 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def file_problem(loc: Location) -> str | None:
    """None when `loc` is a regular file (symlinks followed), else why it cannot be read.

    Checked before opening, so that a FIFO or device never blocks a read.
    """
    try:
        kind = loc.fs.get_file_info(loc.path).type
    except OSError as exc:  # e.g. a name too long for the filesystem
        return f"cannot be read: {' '.join(str(exc).split())}"
    if kind == pafs.FileType.File:
        return None
    if kind == pafs.FileType.NotFound:
        return "file not found"
    if kind == pafs.FileType.Directory:
        return "is a directory"
    return "not a regular file (a FIFO, socket or device)"


def read_regular(loc: Location) -> bytes | None:
    """The bytes of `loc` when it is a readable regular file, else None."""
    if file_problem(loc) is not None:
        return None
    try:
        return loc.read_bytes()
    except OSError:
        return None


def is_parquet_file(loc: Location) -> bool:
    """Whether `loc` is a regular file starting with Parquet's magic `PAR1`, whatever its name
    (a FIFO or device is never opened to look)."""
    if file_problem(loc) is not None:
        return False
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def check_input_file(loc: Location, what: str) -> None:
    """DataError (one line) unless `loc` is a regular file: `what not found: loc`, ..."""
    problem = file_problem(loc)
    if problem == "file not found":
        raise DataError(f"{what} not found: {loc}")
    if problem is not None:
        raise DataError(f"{what} {loc}: {problem}")


class CsvStream:
    """The records of one CSV as dicts, read line by line; errors name the file and line."""

    def __init__(self, src: Location, binary: io.BufferedIOBase, gzipped: bool,
                 comments: str | None = None) -> None:
        self.src = src
        self._gzipped = gzipped
        self._binary = binary
        self._comments = comments
        self._number = 0
        self._record: list[str] = []  # the physical lines of the record being read
        self._first = 0  # the line its first line is
        self._eof = False
        csv.field_size_limit(FIELD_LIMIT)
        self._reader = csv.reader(self._lines())
        self.fieldnames: list[str] = self._next() or []

    @property
    def line(self) -> int:
        """Physical lines read so far (the current record's last line)."""
        return self._number

    def _lines(self) -> Iterator[str]:
        number = 0
        while True:
            try:
                raw = self._binary.readline(FIELD_LIMIT + 1)
            except (OSError, EOFError, zlib.error) as exc:
                what = "is not a readable gzip file" if self._gzipped else "cannot be read"
                raise DataError(f"{self.src} {what}: {' '.join(str(exc).split())}") from None
            if not raw:
                self._eof = True
                return
            number += 1
            self._number = number
            if number == 1 and raw.startswith(UTF16_BOMS):
                raise DataError(f"{self.src} is UTF-16 text; save it as UTF-8")
            if len(raw) > FIELD_LIMIT:
                raise DataError(
                    f"{self.src}: line {number} is longer than {FIELD_LIMIT // 2**20} MiB"
                )
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{self.src}: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                    f"column {exc.start + 1}); save the file as UTF-8"
                ) from None
            if "\0" in text:  # UTF-16 without a BOM decodes as UTF-8 with a NUL every other byte
                raise DataError(f"{self.src}: line {number} holds NUL bytes: not UTF-8 text "
                                f"(UTF-16?); save the file as UTF-8")
            if self._comments is not None and (
                    not text.strip() or text.lstrip().startswith(self._comments)):
                continue
            if not self._record:
                self._first = number
            self._record.append(text)
            yield text

    def _next(self) -> list[str] | None:
        self._record = []
        try:
            row = next(self._reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            text = str(exc)
            if "field larger than field limit" in text:
                text = f"a field is larger than the limit of {FIELD_LIMIT // 2**20} MiB"
            elif "new-line character seen in unquoted field" in text:
                text = "its lines end in a bare CR (old Mac style); save it with LF line endings"
            raise DataError(f"{self.src}: line {self.line}: not valid CSV ({text})") from None
        lines = len(self._record)
        if lines > 1 and self._eof and _unclosed_quote(self._record):
            # the lenient reader takes an unclosed quote's field to the end of the file: every
            # record after it vanished into one field, with at most a vague warning
            raise DataError(f"{self.src}: line {self._first}: not valid CSV (a quoted field opened on "
                            f"this line is never closed; the {lines - 1} line(s) "
                            f"after it would be read as part of it)")
        if lines > 1 and self.fieldnames and len(row) != len(self.fieldnames):
            # a stray quote closed by a later quoted field: the lines between became one field
            raise DataError(f"{self.src}: line {self._first}: not valid CSV (a quoted field opened on "
                            f"this line runs over {lines} lines into a row of {len(row)} fields, "
                            f"where the header has {len(self.fieldnames)}: a stray quote?)")
        return row

    def rows(self) -> Iterator[list[str]]:
        """Each non-blank record after the header as its list of fields (`line`: its last line)."""
        while (row := self._next()) is not None:
            if row:
                yield row

    def __iter__(self) -> Iterator[dict[str, str]]:
        """Each non-blank record as {column: value} (short rows lack the missing columns)."""
        for row in self.rows():
            yield dict(zip(self.fieldnames, row, strict=False))


def _unclosed_quote(lines: list[str]) -> bool:
    """Whether a record's lines end inside a quoted field (what the strict reader calls
    'unexpected end of data'; the lenient one, which flagsim uses for stray quotes inside
    fields, ends the field at the end of the file instead)."""
    try:
        next(csv.reader(lines, strict=True))
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    except StopIteration:
        return False
    return False


@contextmanager
def open_csv(src: Location, what: str = "CSV", comments: str | None = None) -> Iterator[CsvStream]:
    """Stream `src` (plain or gzipped, UTF-8 with or without BOM) as a CsvStream.

    `comments` (e.g. "#"): lines starting with it, and blank lines, are skipped before parsing.
    """
    check_input_file(src, what)
    try:
        raw = io.BufferedReader(src.fs.open_input_stream(src.path, compression=None))
    except OSError as exc:
        raise DataError(f"cannot open {src}: {' '.join(str(exc).split())}") from None
    with raw:
        gzipped = src.name.endswith(".gz") or raw.peek(2)[:2] == GZIP_MAGIC
        binary: io.BufferedIOBase = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        with binary:
            yield CsvStream(src, binary, gzipped, comments)
