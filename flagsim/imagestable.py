"""The images table on storage as a handle: row counts, streamed hashes, row ranges; never read whole."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flagsim.errors import DataError
from flagsim.rundir import shard_index, shard_name
from flagsim.schema import IMAGE_REF_COLUMNS, IMAGES_SCHEMA, check_columns, conform, with_optional
from flagsim.storage import Location

#: Columns the identity hashes are made of (`images.images_table_hash`).
HASH_COLUMNS = ("image_id", "path", "sha256", "member", "offset")


@dataclass(frozen=True)
class TablePart:
    """One Parquet file of the table: rows [start, start + rows) of the whole."""

    uri: str
    start: int
    rows: int


@dataclass(frozen=True)
class Scan:
    """What one streamed pass over the table found (`ImagesTable.scan`)."""

    images_hash: str
    shard_hashes: dict[str, str]  # shard file name -> hash of its rows


class ImagesTable:
    """An images table (one `.parquet` file or a folder of `part-NNNNN.parquet`) read part by
    part and row group by row group: the driver of an embed keeps its row count, the parts'
    names and the hashes, and read tasks read their own rows (`read_rows`)."""

    def __init__(self, location: str | Location) -> None:
        from flagsim.images import images_table_location

        loc = images_table_location(location)
        self.location = loc
        if loc.is_file():
            files = [loc]
        else:
            files = [p for p in loc.list(".parquet") if shard_index(p.name) is not None]
            if not files:
                raise DataError(f"images table {loc} is a folder without part-NNNNN.parquet files")
        parts, start = [], 0
        for f in files:
            try:
                with f.fs.open_input_file(f.path) as fh:
                    pf = pq.ParquetFile(fh)
                    rows, names = pf.metadata.num_rows, pf.schema_arrow.names
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{f} is not a readable Parquet file: {exc}") from None
            missing = [c for c in IMAGES_SCHEMA.names if c not in names and c not in IMAGE_REF_COLUMNS]
            if missing:
                raise DataError(f"images table {f} is missing column(s) {', '.join(missing)}")
            parts.append(TablePart(f.uri, start, rows))
            start += rows
        self.parts = parts
        self.num_rows = start

    def __repr__(self) -> str:
        return f"ImagesTable({self.location}, {self.num_rows} rows, {len(self.parts)} part(s))"

    def iter_tables(self, columns: tuple[str, ...] | None = None) -> Iterator[pa.Table]:
        """The rows in order, one row group at a time, conformed to IMAGES_SCHEMA (`columns`)."""
        for part in self.parts:
            loc = Location.parse(part.uri)
            with loc.fs.open_input_file(loc.path) as fh:
                pf = pq.ParquetFile(fh)
                for g in range(pf.metadata.num_row_groups):
                    yield _conformed(pf.read_row_group(g, columns=_present(pf, columns)), columns)

    def read(self) -> pa.Table:
        """The whole table in memory (for small tables and callers that need every row)."""
        tables = list(self.iter_tables())
        return pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table()

    def scan(self, shard_size: int) -> Scan:
        """One streamed pass: the table's identity hash, each shard's rows hash (the values
        `images.images_table_hash` and `pipeline.plan.rows_hashes` give for the same table in
        memory), and a DataError when an image_id repeats (checked by 64-bit hashes)."""
        whole = hashlib.sha256()
        shards: dict[str, str] = {}
        current, shard = hashlib.sha256(), 0
        row = 0
        keys: list[np.ndarray] = []
        for t in self.iter_tables(HASH_COLUMNS):
            cols = [t.column(c).to_pylist() for c in HASH_COLUMNS]
            keys.append(_id_hashes(cols[0]))
            for i, p, s, m, o in zip(*cols, strict=True):
                ref = f"\t{m}\t{o}" if m is not None else ""
                line = f"{i}\t{p}\t{s}{ref}\n".encode()
                whole.update(line)
                current.update(line)
                row += 1
                if row % shard_size == 0:
                    shards[shard_name(shard)] = current.hexdigest()[:16]
                    current, shard = hashlib.sha256(), shard + 1
        if row % shard_size:
            shards[shard_name(shard)] = current.hexdigest()[:16]
        if keys:
            h = np.concatenate(keys)
            if np.unique(h).size != h.size:
                raise DataError(f"images table {self.location} has duplicate image_id values")
        return Scan(whole.hexdigest()[:16], shards)


def read_rows(parts: list[TablePart], start: int, stop: int,
              columns: tuple[str, ...] | None = None) -> pa.Table:
    """Rows [start, stop) of the table made of `parts` (read tasks: only the row groups that
    hold them are read), conformed to IMAGES_SCHEMA's `columns`."""
    starts = [p.start for p in parts]
    out = []
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(parts) and parts[i].start < stop:
        part = parts[i]
        lo, hi = max(start, part.start) - part.start, min(stop, part.start + part.rows) - part.start
        if hi > lo:
            loc = Location.parse(part.uri)
            with loc.fs.open_input_file(loc.path) as fh:
                pf = pq.ParquetFile(fh)
                groups, g_start, first = [], 0, None
                for g in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    if g_start < hi and g_start + n > lo:
                        groups.append(g)
                        first = g_start if first is None else first
                    g_start += n
                t = pf.read_row_groups(groups, columns=_present(pf, columns))
                out.append(_conformed(t.slice(lo - first, hi - lo), columns))
        i += 1
    return pa.concat_tables(out) if out else _conformed(IMAGES_SCHEMA.empty_table(), columns)


#: Row groups a process keeps after reading them (read tasks read adjacent rows).
_GROUPS: dict[tuple, pa.Table] = {}
_MAX_GROUPS = 4


def _row_group(part: TablePart, g: int, columns: tuple[str, ...] | None) -> pa.Table:
    """Row group `g` of `part`, conformed to `columns` (cached per process)."""
    key = (part.uri, g, columns)
    hit = _GROUPS.get(key)
    if hit is None:
        loc = Location.parse(part.uri)
        with loc.fs.open_input_file(loc.path) as fh:
            pf = pq.ParquetFile(fh)
            hit = _conformed(pf.read_row_group(g, columns=_present(pf, columns)), columns)
        while len(_GROUPS) >= _MAX_GROUPS:
            _GROUPS.pop(next(iter(_GROUPS)))
        _GROUPS[key] = hit
    return hit


def _groups_of(part: TablePart) -> list[int]:
    """Row counts of `part`'s row groups (cached per process)."""
    n = _GROUP_ROWS.get(part.uri)
    if n is None:
        loc = Location.parse(part.uri)
        with loc.fs.open_input_file(loc.path) as fh:
            meta = pq.ParquetFile(fh).metadata
            n = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        _GROUP_ROWS[part.uri] = n
    return n


_GROUP_ROWS: dict[str, list[int]] = {}


def read_positions(parts: list[TablePart], pos: np.ndarray,
                   columns: tuple[str, ...] | None = None) -> pa.Table:
    """The rows numbered `pos` (any order) of the table made of `parts`, in that order; the
    row groups read are cached per process, so a task's adjacent batches read each once."""
    starts = [p.start for p in parts]
    pieces = []
    for r in np.asarray(pos, dtype=np.int64).tolist():
        i = bisect.bisect_right(starts, r) - 1
        if i < 0 or r >= parts[i].start + parts[i].rows:
            raise DataError(f"row {r} is outside the images table")
        local, g, g_start = r - parts[i].start, 0, 0
        sizes = _groups_of(parts[i])
        while g_start + sizes[g] <= local:
            g_start += sizes[g]
            g += 1
        group = _row_group(parts[i], g, columns)
        pieces.append(group.slice(local - g_start, 1))
    return pa.concat_tables(pieces) if pieces else _conformed(IMAGES_SCHEMA.empty_table(), columns)


def _present(pf: pq.ParquetFile, columns: tuple[str, ...] | None) -> list[str] | None:
    if columns is None:
        return None
    return [c for c in columns if c in pf.schema_arrow.names]


def _conformed(t: pa.Table, columns: tuple[str, ...] | None) -> pa.Table:
    t = with_optional(t, IMAGES_SCHEMA, IMAGE_REF_COLUMNS)
    if columns is None:
        check_columns(t, IMAGES_SCHEMA, "images table")
        return conform(t, IMAGES_SCHEMA)
    schema = pa.schema([IMAGES_SCHEMA.field(c) for c in columns])
    return conform(t, schema)


def _id_hashes(ids: list[str]) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little", signed=True)
         for i in ids], dtype=np.int64,
    )
