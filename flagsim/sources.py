"""Images tables from webdataset tar shards, Parquet image columns and URL lists, built streaming."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flagsim.errors import DataError
from flagsim.images import probe_image
from flagsim.inputfiles import check_input_file, file_problem, is_parquet_file
from flagsim.refs import cell_bytes
from flagsim.rundir import RunDir, shard_name
from flagsim.schema import CONTAINER_PARQUET, CONTAINER_TAR, ERRORS_SCHEMA, IMAGES_SCHEMA
from flagsim.storage import Location, walk_files

log = logging.getLogger(__name__)

#: Rows per part of a streamed images table; a table of more rows becomes a folder of parts.
PART_ROWS = 100_000
#: Rows per row group of a staged part (what memory holds while a table is built).
BATCH_ROWS = 10_000
#: Image members of a webdataset sample, by extension, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: Keys of a sample's `.json` member whose text becomes the row's name, in order.
CAPTION_KEYS = ("caption", "name", "text", "title")
_ALT = "_alt_id"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


# --- the streaming table writer --------------------------------------------------------------

def _key_hash(ids: list[str]) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little", signed=True)
         for i in ids], dtype=np.int64,
    )


@dataclass
class TableWriter:
    """Collects images-table rows into staged Parquet parts of `part_rows`, written in row groups
    of BATCH_ROWS, so that memory holds one row group (plus 8 bytes per row for the uniqueness
    check), never the whole table.

    Clashing ids follow the folder source's rule: every row of a clashing id takes its longer
    form (`<shard or file stem>/<key>`, given as the row's `alt_id`).
    """

    run: RunDir
    part_rows: int = PART_ROWS
    errors: list[dict] = field(default_factory=list)
    rows: int = 0
    _buf: list[dict] = field(default_factory=list)
    _parts: list[Location] = field(default_factory=list)
    _hashes: list[np.ndarray] = field(default_factory=list)
    _tmp: Location | None = None
    _part: tuple[Any, Any] | None = None  # (output stream, ParquetWriter) of the open part
    _part_rows: int = 0

    def add(self, row: dict, alt_id: str) -> None:
        self._buf.append({**row, _ALT: alt_id})
        if len(self._buf) >= min(BATCH_ROWS, self.part_rows - self._part_rows):
            self._spill()

    def error(self, image_id: str | None, name: str | None, path: str, reason: str) -> None:
        self.errors.append({"image_id": image_id, "name": name, "path": path, "stage": "images",
                            "model": None, "reason": reason})
        log.warning("skipped %s: %s", path, reason)

    def _spill(self) -> None:
        if not self._buf:
            return
        schema = IMAGES_SCHEMA.append(pa.field(_ALT, pa.string()))
        table = pa.Table.from_pylist(self._buf, schema=schema)
        self._buf = []
        if self._part is None:
            if self._tmp is None:
                self._tmp = self.run.staging / f"images-{uuid.uuid4().hex[:12]}"
                self._tmp.mkdirs()
            loc = self._tmp / shard_name(len(self._parts))
            stream = loc.fs.open_output_stream(loc.path)
            self._part = (stream, pq.ParquetWriter(stream, schema, compression="zstd"))
            self._parts.append(loc)
            self._hashes.append(np.empty(0, np.int64))
        self._part[1].write_table(table)
        self._hashes[-1] = np.concatenate([self._hashes[-1],
                                           _key_hash(table.column("image_id").to_pylist())])
        self.rows += table.num_rows
        self._part_rows += table.num_rows
        if self._part_rows >= self.part_rows:
            self._close_part()

    def _close_part(self) -> None:
        if self._part is not None:
            stream, writer = self._part
            writer.close()
            stream.close()
            self._part, self._part_rows = None, 0

    def finish(self, what: str) -> Location:
        """Write the images table (one file, or a folder of parts) and the errors; its location."""
        self._spill()
        self._close_part()
        if not self.rows:
            self._cleanup()
            raise DataError(f"no images found in {what}")
        hashes = np.concatenate(self._hashes)
        values, counts = np.unique(hashes, return_counts=True)
        clash = values[counts > 1]
        if clash.size:
            log.info("%d image id(s) occur more than once; those rows use <stem>/<key>", clash.size)
            check = np.concatenate([_key_hash(self._final_ids(loc.read_parquet(), h, clash).to_pylist())
                                    for loc, h in zip(self._parts, self._hashes, strict=True)])
            if np.unique(check).size != check.size:
                values, counts = np.unique(check, return_counts=True)
                dup = set(values[counts > 1].tolist())
                named: list[str] = []  # the first few, by name (their hashes found them)
                for loc, h in zip(self._parts, self._hashes, strict=True):
                    ids = self._final_ids(loc.read_parquet(), h, clash).to_pylist()
                    for i, k in zip(ids, _key_hash(ids).tolist(), strict=True):
                        if k in dup and i not in named:
                            named.append(i)
                    if len(named) >= 3:
                        break
                self._cleanup()
                raise DataError(f"duplicate image_id(s) in {what} even as <stem>/<key>: "
                                f"{', '.join(named[:3])}" + (" …" if len(dup) > 3 else ""))
        target = self.run.images_table
        target.delete()
        single = len(self._parts) == 1
        for i, (loc, h) in enumerate(zip(self._parts, self._hashes, strict=True)):  # one part at a time
            table = loc.read_parquet()
            ids = self._final_ids(table, h, clash)
            table = table.drop_columns([_ALT]).set_column(0, IMAGES_SCHEMA.field("image_id"), ids)
            (target if single else target / shard_name(i)).write_parquet(table, staging=self.run.staging)
            del table, ids
        self._cleanup()
        err = self.run.errors_dir("images") / "part-00000.parquet"
        if self.errors:
            err.write_parquet(pa.Table.from_pylist(self.errors, schema=ERRORS_SCHEMA))
        elif err.exists():
            err.delete()
        log.info("wrote %s (%d images in %d part(s))", target, self.rows, len(self._parts))
        return target

    @staticmethod
    def _final_ids(table: pa.Table, hashes: np.ndarray, clash: np.ndarray) -> pa.Array:
        ids = table.column("image_id").combine_chunks()
        if not clash.size:
            return ids
        import pyarrow.compute as pc

        return pc.if_else(pa.array(np.isin(hashes, clash)), table.column(_ALT).combine_chunks(), ids)

    def _cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.delete()


def _image_row(image_id: str, name: str, path: str, data: bytes, **ref: Any) -> dict:
    info = probe_image(data)
    return {"image_id": image_id, "name": name, "path": path, "source_url": None,
            "sha256": info.sha256, "width": info.width, "height": info.height,
            "format": info.format, **ref}


# --- webdataset ------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """`shard-{00000..00002}.tar` → three names (zero padding kept); `{a,b}` lists; several
    braces multiply. DataError for a malformed range."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        if hi < lo:
            raise DataError(f"brace range {{{body}}} in {pattern!r} runs backwards")
        width = len(rng.group(1))
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise DataError(f"brace {{{body}}} in {pattern!r} is neither a range a..b nor a list a,b")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return list(itertools.chain.from_iterable(expand_braces(head + c + tail) for c in choices))


def shard_locations(pattern: str) -> list[Location]:
    """The tar shards of `pattern` (a brace pattern, one .tar, or a folder of .tar files)."""
    names = expand_braces(pattern)
    if len(names) == 1:
        loc = Location.parse(names[0])
        if file_problem(loc) == "is a directory":
            found = [f for f in walk_files(loc) if f.name.endswith(".tar")]
            if not found:
                raise DataError(f"no .tar shards in folder {loc}")
            return found
    locs = [Location.parse(n) for n in names]
    for loc in locs:
        check_input_file(loc, "webdataset shard")
    return locs


def _split_key(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the member path up to the first dot of its base name."""
    head, _, base = name.rpartition("/")
    if "." not in base.lstrip("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


@dataclass
class Sample:
    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)


def iter_samples(loc: Location) -> Iterator[Sample]:
    """The samples of one tar shard, members grouped by key (consecutive, as webdataset writes
    them); seeks past member data, so listing reads only the headers."""
    with loc.fs.open_input_file(loc.path) as f:
        if f.read(2) == b"\x1f\x8b":
            raise DataError(f"{loc} is gzip-compressed; webdataset shards must be plain .tar files")
        f.seek(0)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed with f
        except tarfile.TarError as exc:
            raise DataError(f"{loc} is not a tar file: {exc}") from None
        current: Sample | None = None
        try:
            for ti in tf:
                if not ti.isfile():
                    continue
                split = _split_key(ti.name)
                if split is None:
                    continue
                key, ext = split
                if current is None or current.key != key:
                    if current is not None:
                        yield current
                    current = Sample(key)
                current.members[ext] = ti
        except tarfile.TarError as exc:
            raise DataError(f"{loc} is truncated or corrupt: {exc}") from None
        if current is not None:
            yield current


def _caption(f: Any, sample: Sample) -> str | None:
    for ext in ("json", "txt"):
        ti = sample.members.get(ext)
        if ti is None or ti.size > 1024 * 1024:
            continue
        raw = f.read_at(ti.size, ti.offset_data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if ext == "txt":
            text = " ".join(text.split())
            if text:
                return text
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for k in CAPTION_KEYS:
                if isinstance(obj.get(k), str) and obj[k].strip():
                    return " ".join(obj[k].split())
    return None


def from_webdataset(pattern: str, run: RunDir, part_rows: int = PART_ROWS) -> TableWriter:
    """Write the run's images table from webdataset tar shards: one row per sample whose image
    member (jpg, jpeg, png or webp) points into its shard (`container=tar`, offset, size);
    `image_id` is the sample's key (`<shard stem>/<key>` for keys in several shards), the name
    the `.json` caption/name or `.txt` text when present, else the key. Samples without an image
    become error rows (stage `images`)."""
    shards = shard_locations(pattern)
    writer = TableWriter(run, part_rows)
    for loc in shards:
        stem = loc.name.removesuffix(".tar")
        samples = 0
        with loc.fs.open_input_file(loc.path) as f:
            try:
                for sample in iter_samples(loc):
                    samples += 1
                    ext = next((e for e in WDS_IMAGE_EXTS if e in sample.members), None)
                    if ext is None:
                        members = ", ".join(sorted(f"{sample.key}.{e}" for e in sample.members))
                        writer.error(sample.key, None, f"{loc}#{members}",
                                     "sample has no image member (jpg, jpeg, png, webp)")
                        continue
                    ti = sample.members[ext]
                    data = f.read_at(ti.size, ti.offset_data)
                    name = _caption(f, sample) or sample.key.rsplit("/", 1)[-1]
                    row = _image_row(sample.key, name, str(loc), data, container=CONTAINER_TAR,
                                     member=ti.name, offset=ti.offset_data, size=ti.size)
                    writer.add(row, f"{stem}/{sample.key}")
            except DataError as exc:
                writer.error(None, None, str(loc), f"{exc} (after {samples} sample(s))")
    writer.finish(f"webdataset shards {pattern}")
    return writer


# --- Parquet ---------------------------------------------------------------------------------

def _is_parquet(loc: Location) -> bool:
    """A Parquet file by its contents (`PAR1`), whatever its suffix, or a folder of them."""
    if file_problem(loc) == "is a directory":
        return any(f.name.endswith(".parquet") for f in walk_files(loc))
    return loc.name.lower().endswith((".parquet", ".pq")) or is_parquet_file(loc)


def parquet_files(path: str) -> list[Location]:
    loc = Location.parse(path)
    problem = file_problem(loc)
    if problem == "is a directory":
        files = [f for f in walk_files(loc) if f.name.endswith(".parquet")]
        if not files:
            raise DataError(f"no .parquet files in folder {loc}")
        return files
    check_input_file(loc, "Parquet file")
    return [loc]


def _image_type_problem(t: pa.DataType) -> str | None:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return None
    if pa.types.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        if "bytes" in names or "path" in names:
            return None
    return f"{t}, not image bytes (binary, or a struct with bytes/path)"


def from_parquet(
    path: str, image_column: str, run: RunDir, id_column: str | None = None,
    name_column: str | None = None, part_rows: int = PART_ROWS,
) -> TableWriter:
    """Write the run's images table from Parquet files whose `image_column` holds image bytes
    (binary, or an HF-style `{bytes, path}` struct): one row per cell, pointing at it
    (`container=parquet`, member = the column, offset = the row). `image_id` is the id column
    (default `<file stem>/<row>`), the name the name column (default the id); null cells and
    ids become error rows."""
    files = parquet_files(path)
    writer = TableWriter(run, part_rows)
    for loc in files:
        with loc.fs.open_input_file(loc.path) as fh:
            try:
                pf = pq.ParquetFile(fh)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"{loc} is not a readable Parquet file: {exc}") from None
            schema = pf.schema_arrow
            for col in (image_column, id_column, name_column):
                if col is not None and col not in schema.names:
                    raise DataError(
                        f"{loc} has no column {col!r} (columns: {', '.join(schema.names)})"
                    )
            problem = _image_type_problem(schema.field(image_column).type)
            if problem:
                raise DataError(f"column {image_column!r} of {loc} is {problem}")
            cols = [c for c in dict.fromkeys((image_column, id_column, name_column)) if c]
            stem = loc.name.removesuffix(".parquet")
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    _parquet_row(writer, loc, stem, row, data, i, image_column, id_column, name_column)
                    row += 1
    writer.finish(f"Parquet {path}")
    return writer


def _parquet_row(
    writer: TableWriter, loc: Location, stem: str, row: int, data: dict, i: int,
    image_column: str, id_column: str | None, name_column: str | None,
) -> None:
    where = f"{loc}#row={row}"
    raw = data[id_column][i] if id_column else f"{stem}/{row}"
    image_id = _text(raw, id_column or "", loc)
    if not image_id.strip():
        what = "null" if raw is None else "empty"
        writer.error(None, None, where, f"{what} {id_column!r} (the id column)")
        return
    name = (_text(data[name_column][i], name_column, loc) if name_column else "") or image_id
    try:
        body = cell_bytes(data[image_column][i], str(loc))
    except (DataError, OSError) as exc:
        writer.error(image_id, name, where, f"{image_column!r}: {' '.join(str(exc).split())}")
        return
    rec = _image_row(image_id, name, str(loc), body, container=CONTAINER_PARQUET,
                     member=image_column, offset=row, size=None)
    writer.add(rec, f"{stem}/{image_id}")




# --- URL lists -------------------------------------------------------------------------------

def read_url_table(path: str, url_column: str = "url", id_column: str | None = None,
                   name_column: str | None = None,
                   rejected: list[dict] | None = None) -> list[dict]:
    """Rows `{url, image_id, name}` of a CSV (plain or gzipped) or Parquet list of image URLs;
    ids default to the safe stem of the name or URL's file. Names come from `name_column`, else
    from a column called `name` when there is one. Rows without a URL, or with one that cannot
    be parsed, are left out; with `rejected`, each is appended to it as `{row, image_id, name,
    reason}` (row: 1-based, after the header; image_id: the safe stem of its id, or None)."""
    from urllib.parse import unquote, urlsplit

    from flagsim.images import safe_stem, unique_stems
    from flagsim.inputfiles import open_csv

    loc = Location.parse(path)

    def wanted(cols: Sequence[str]) -> list[str]:
        nonlocal name_column
        if name_column is None and "name" in cols:  # as import-embeddings reads its names
            name_column = "name"
        return [c for c in (url_column, id_column, name_column) if c]

    if _is_parquet(loc):
        files = parquet_files(path)  # a file, or a folder of parts (read in name order)
        table = pa.concat_tables([f.read_parquet() for f in files], promote_options="default")
        cols = table.column_names
        records: list[dict] = []
        missing = [c for c in wanted(cols) if c not in cols]
        if not missing:
            records = table.select(list(dict.fromkeys(wanted(cols)))).to_pylist()
    else:
        with open_csv(loc, "URL table") as reader:
            cols = reader.fieldnames or []
            missing = [c for c in wanted(cols) if c not in cols]
            records = [] if missing else list(reader)
    if missing:
        raise DataError(f"{loc} has no column {missing[0]!r} (columns: {', '.join(cols) or 'none'})")
    rows = []
    for number, rec in enumerate(records, 1):
        url = _text(rec.get(url_column), url_column, loc).strip()
        name = _text(rec.get(name_column), name_column, loc).strip() if name_column else ""
        ident = _text(rec.get(id_column), id_column, loc).strip() if id_column else ""
        try:
            base = unquote(urlsplit(url).path.rsplit("/", 1)[-1]).rsplit(".", 1)[0] or "image"
            problem = None if url else f"no URL in column {url_column!r}"
        except ValueError as exc:  # e.g. "Invalid IPv6 URL"
            problem = f"{url!r} is not a URL ({exc})"
        if problem is not None:
            if rejected is not None:
                rejected.append({"row": number, "image_id": safe_stem(ident) if ident else None,
                                 "name": name or ident or None, "reason": problem})
            continue
        rows.append({"url": url, "image_id": ident, "name": name or ident or base.replace("_", " ")})
    if not rows:
        raise DataError(f"{loc} lists no URLs in column {url_column!r}")
    stems = unique_stems(r["image_id"] or r["name"] for r in rows)
    for r, stem in zip(rows, stems, strict=True):
        r["image_id"] = stem
    return rows


def _text(value: object, column: str, loc: object) -> str:
    """A cell of a URL table's id, name or URL column as text: None is empty, 0 is "0",
    bytes are decoded as UTF-8; a list, map or struct cell is an error naming the column."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{loc}: column {column!r} holds bytes that are not UTF-8 text") from None
    elif isinstance(value, (list, tuple, dict)):
        raise DataError(f"{loc}: column {column!r} holds {type(value).__name__}s, not text")
    return str(value)


@dataclass
class UrlResult:
    """What `from_urls` did: rows in the table, and the scraper's counts."""

    images: int
    listed: int
    downloaded: int
    unchanged: int
    reused: int
    errors: list[dict]


def from_urls(path: str, run: RunDir, opts: Any, url_column: str = "url",
              id_column: str | None = None, name_column: str | None = None) -> UrlResult:
    """Download every URL of a list into the run's `images/` with the scraper's fetcher (its host
    policy, timeouts, size cap, retries, User-Agent and bounded concurrency: `opts` is a
    `ScrapeOptions`) and write the images table; resumable like `flagsim scrape` (a file whose
    URL and sha256 match the previous table is not fetched again). Failures, and rows without
    a URL, go to `errors/images/` (download failures also to the scraper's `errors.csv`)."""
    from flagsim.scrape import Fetcher, FlagEntry, PlannedImage, _download_all

    rejected: list[dict] = []
    rows = read_url_table(path, url_column, id_column, name_column, rejected)
    no_url = [{"image_id": r["image_id"], "name": r["name"], "path": None, "stage": "download",
               "model": None, "reason": f"row {r['row']} of {path}: {r['reason']}"}
              for r in rejected]
    if no_url:
        log.warning("%d row(s) of %s have no usable URL (first: row %d, %s); see errors/images/",
                    len(no_url), path, rejected[0]["row"], rejected[0]["reason"])
    items = [PlannedImage(FlagEntry(r["name"], r["url"], "urls", 1), r["image_id"], r["url"])
             for r in rows]
    fetcher = Fetcher(opts)
    err = run.errors_dir("images") / "part-00000.parquet"
    try:
        result = _download_all(run, items, fetcher, opts)
    except DataError:
        errors = no_url + _url_errors(read_errors(run))
        if errors:
            err.write_parquet(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
        raise
    finally:
        fetcher.close()
    errors = no_url + _url_errors(result.errors)
    if errors:
        err.write_parquet(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
    elif err.exists():
        err.delete()
    # rows without a usable URL are listed too, as failed: "N of M" counts every row
    return UrlResult(result.table.num_rows, result.listed + len(no_url), result.downloaded,
                     result.unchanged, result.reused, errors)


def read_errors(run: RunDir) -> list[dict]:
    from flagsim.scrape import read_errors_csv

    loc = run.root / "errors.csv"
    return read_errors_csv(loc) if loc.exists() else []


def _url_errors(scrape_errors: list[dict]) -> list[dict]:
    """The scraper's error rows as errors-table rows (stage `download`)."""
    out = []
    for e in scrape_errors:
        detail = f": {e['detail']}" if e.get("detail") else ""
        out.append({"image_id": e.get("image_id"), "name": e.get("name"), "path": e.get("url"),
                    "stage": "download", "model": None,
                    "reason": " ".join(f"{e.get('reason')}{detail}".split())})
    return out
