"""Read an image's bytes where the images table says they live: a file, a tar member, a Parquet cell."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flagsim.errors import DataError
from flagsim.schema import CONTAINER_PARQUET, CONTAINER_TAR
from flagsim.storage import Location, is_uri

log = logging.getLogger(__name__)

#: Containers (tar shards, Parquet files) a reader keeps open at once.
MAX_OPEN = 4


@dataclass(frozen=True)
class ImageRef:
    """One row's reference: `path` alone is a file; with a container, a member or cell in it."""

    path: str
    container: str | None = None
    member: str | None = None  # tar member name | Parquet image column
    offset: int | None = None  # tar: data offset in bytes | Parquet: row number in the file
    size: int | None = None  # tar: member size in bytes

    def describe(self) -> str:
        """How the errors table names it: `shard.tar#member`, `file.parquet#row=12`, or the path."""
        if self.container == CONTAINER_TAR:
            return f"{self.path}#{self.member}"
        if self.container == CONTAINER_PARQUET:
            return f"{self.path}#row={self.offset}"
        return self.path

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ImageRef:
        return cls(
            str(row["path"]), _text(row.get("container")), _text(row.get("member")),
            _int(row.get("offset")), _int(row.get("size")),
        )


def _text(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return str(v) or None


def _int(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return int(v)


class _Parquet:
    """One open Parquet file, with the row group read last (rows of a read task are adjacent)."""

    def __init__(self, loc: Location) -> None:
        self.file = loc.fs.open_input_file(loc.path)
        self.pf = pq.ParquetFile(self.file)
        meta = self.pf.metadata
        self.starts = []
        start = 0
        for g in range(meta.num_row_groups):
            self.starts.append(start)
            start += meta.row_group(g).num_rows
        self.rows = start
        self._group: tuple[int, str, pa.ChunkedArray] | None = None

    def cell(self, column: str, row: int) -> Any:
        if not 0 <= row < self.rows:
            raise DataError(f"row {row} is outside the file ({self.rows} rows)")
        import bisect

        g = bisect.bisect_right(self.starts, row) - 1
        if self._group is None or self._group[:2] != (g, column):
            if column not in self.pf.schema_arrow.names:
                raise DataError(f"no column {column!r}")
            self._group = (g, column, self.pf.read_row_group(g, columns=[column]).column(0))
        return self._group[2][row - self.starts[g]].as_py()

    def close(self) -> None:
        self.file.close()


class ByteReader:
    """Reads the bytes of ImageRefs, keeping the last MAX_OPEN containers open, so that a read
    task whose rows come from one tar shard or Parquet file opens it once, not once per image."""

    def __init__(self, max_open: int = MAX_OPEN) -> None:
        self.max_open = max_open
        self._open: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.opened = 0  # containers opened so far (what the tests and benchmarks count)

    def read(self, ref: ImageRef) -> bytes:
        """The image's bytes; DataError (one line) or OSError when they cannot be read."""
        if ref.container is None:
            return Location.parse(ref.path).read_bytes()
        if ref.container == CONTAINER_TAR:
            if ref.offset is None or ref.size is None:
                raise DataError("tar reference without offset and size")
            f = self._get(ref.path, CONTAINER_TAR)
            data = f.read_at(ref.size, ref.offset)
            if len(data) != ref.size:
                raise DataError(f"tar member cut short: {len(data)} of {ref.size} bytes")
            return data
        if ref.container == CONTAINER_PARQUET:
            if ref.member is None or ref.offset is None:
                raise DataError("Parquet reference without column and row")
            value = self._get(ref.path, CONTAINER_PARQUET).cell(ref.member, ref.offset)
            return cell_bytes(value, ref.path)
        raise DataError(f"unknown container {ref.container!r} in the images table")

    def _get(self, path: str, kind: str) -> Any:
        key = (path, kind)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        loc = Location.parse(path)
        handle = _Parquet(loc) if kind == CONTAINER_PARQUET else loc.fs.open_input_file(loc.path)
        self.opened += 1
        self._open[key] = handle
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return handle

    def close(self) -> None:
        while self._open:
            _, h = self._open.popitem()
            h.close()


def cell_bytes(value: Any, parquet_path: str) -> bytes:
    """An image cell's bytes: a binary value, or an HF `{bytes, path}` struct (path relative to
    the Parquet file's folder when not absolute); DataError for a null or unusable cell."""
    if value is None:
        raise DataError("null image cell")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            p = str(value["path"])
            loc = Location.parse(p) if is_uri(p) or p.startswith("/") else (
                Location.parse(parquet_path).parent / p
            )
            return loc.read_bytes()
        raise DataError("image struct has neither bytes nor path")
    raise DataError(f"image cell is {type(value).__name__}, not bytes")


#: One reader per worker process: a Ray read task runs its batches in one process.
_READER = ByteReader()


def read_ref(ref: ImageRef) -> bytes:
    """`ByteReader.read` through this process's reader."""
    return _READER.read(ref)


def process_reader() -> ByteReader:
    return _READER
