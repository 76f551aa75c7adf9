"""Import embeddings made elsewhere (a Parquet table, or clip-retrieval's npy + metadata) as shards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.lib.format as npy_format
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flagsim.errors import ConfigError, DataError
from flagsim.images import images_table_hash, read_images_table
from flagsim.importcsv import ImportResult, _images_table, check_model_name
from flagsim.rundir import RunDir, shard_index, shard_name
from flagsim.schema import SCHEMA_VERSION
from flagsim.shards import (
    Manifest,
    discard_model,
    embeddings_table,
    missing_or_resized,
    read_manifest,
    write_manifest,
    write_shard,
)
from flagsim.storage import Location, walk_files

log = logging.getLogger(__name__)

FORMATS = ("auto", "parquet", "clip-retrieval")
SOURCE_PREFIX = "flagsim import-embeddings"
STAGE_PREFIX = "import-"  # + a uuid4 hex: an import's staging folder under the run's `_tmp/`
ID_COLUMN = "image_id"
NAME_COLUMN = "name"
VECTOR_COLUMN = "embedding"
#: clip-retrieval's metadata columns that can serve as the id, in order of preference.
CLIP_ID_COLUMNS = ("key", "image_path", "url")
CLIP_NAME_COLUMN = "caption"
#: Rows read from the input at a time (one Parquet batch, one slice of an npy file).
BATCH_ROWS = 8192

_PART = re.compile(r"^(img_emb|metadata)_(\d+)\.(npy|parquet)$")


@dataclass(frozen=True)
class EmbeddingsImport(ImportResult):
    """What `import_embeddings` wrote (ImportResult plus the input's format and file count)."""

    format: str = "parquet"
    files: int = 0


# --- reading the input ----------------------------------------------------------------------

@dataclass
class _Chunk:
    """Consecutive rows of one input file: ids, names, each row's vector length, the values."""

    where: str  # the file of the vectors (the npy file for clip-retrieval)
    start: int  # row of the first one in that file (0-based)
    ids: list[str]
    names: list[str]
    lengths: np.ndarray  # [n] int
    values: np.ndarray  # every row's values, concatenated
    id_where: str = ""  # the file of the ids, when not `where` (clip-retrieval's metadata)


def _short(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def _open_parquet(loc: Location) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(loc.path, filesystem=loc.fs)  # its own handle: close() closes it
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{loc} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _columns_hint(schema: pa.Schema) -> str:
    return ", ".join(schema.names) or "none"


def _strings(col: pa.Array, where: str, what: str) -> pa.Array:
    try:
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{where}: {what} column of type {col.type} cannot be read as text") from None


def _ids_names(where: str, start: int, id_col: pa.Array, name_col: pa.Array | None,
               id_name: str) -> tuple[list[str], list[str]]:
    """The batch's ids (refusing null and empty ones) and names (the id where null)."""
    ids = _strings(id_col, where, f"id column '{id_name}'").to_pylist()
    for i, v in enumerate(ids):
        if not v:
            raise DataError(f"{where}: row {start + i}: {'null' if v is None else 'empty'} id "
                            f"in column '{id_name}'")
    if name_col is None:
        return ids, list(ids)
    names = _strings(name_col, where, "name").to_pylist()
    return ids, [n if n else i for i, n in zip(ids, names, strict=True)]


@dataclass
class _ParquetPart:
    loc: Location
    id_column: str
    name_column: str | None
    vector_column: str


def _parquet_files(src: Location) -> list[Location]:
    if src.is_file():
        return [src]
    out = []
    for loc in walk_files(src):
        rel = loc.path[len(src.path):].strip("/").split("/")
        if loc.name.endswith(".parquet") and not any(p.startswith((".", "_")) for p in rel):
            out.append(loc)
    if not out:
        raise DataError(f"no Parquet files in {src}")
    return out


def _plan_parquet(src: Location, id_column: str | None, name_column: str | None,
                  vector_column: str | None) -> list[_ParquetPart]:
    """Each file's columns, checked from its footer (nothing read yet)."""
    parts = []
    for loc in _parquet_files(src):
        pf = _open_parquet(loc)
        schema = pf.schema_arrow
        pf.close()
        id_col = id_column or ID_COLUMN
        vec_col = vector_column or VECTOR_COLUMN
        for col, opt in ((id_col, "--id-column"), (vec_col, "--vector-column")):
            if col not in schema.names:
                raise DataError(f"{loc} has no column '{col}' (columns: {_columns_hint(schema)}); "
                                f"pass {opt}")
        if name_column is not None and name_column not in schema.names:
            raise DataError(f"{loc} has no column '{name_column}' (columns: {_columns_hint(schema)})")
        name_col = name_column or (NAME_COLUMN if NAME_COLUMN in schema.names else None)
        typ = schema.field(vec_col).type
        is_list = pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
        if not is_list or not pa.types.is_floating(typ.value_type):
            raise DataError(f"{loc}: column '{vec_col}' is {typ}, not a list of floats")
        parts.append(_ParquetPart(loc, id_col, name_col, vec_col))
    return parts


def _read_parquet(parts: list[_ParquetPart]) -> Iterator[_Chunk]:
    for part in parts:
        where = str(part.loc)
        pf = _open_parquet(part.loc)
        cols = list(dict.fromkeys(c for c in (part.id_column, part.name_column, part.vector_column) if c))
        start = 0
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                yield _parquet_chunk(part, where, start, batch)
                start += batch.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{where}: not readable near row {start} ({str(exc).splitlines()[0]})") from None
        finally:
            pf.close()


def _parquet_chunk(part: _ParquetPart, where: str, start: int, batch: pa.RecordBatch) -> _Chunk:
    ids, names = _ids_names(where, start, batch.column(part.id_column),
                            batch.column(part.name_column) if part.name_column else None, part.id_column)
    vec = batch.column(part.vector_column)
    if vec.null_count:
        i = int(np.flatnonzero(vec.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {start + i} (id {_short(ids[i])}): null in column "
                        f"'{part.vector_column}'")
    if pa.types.is_fixed_size_list(vec.type):
        lengths = np.full(len(vec), vec.type.list_size, dtype=np.int64)
    else:
        lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False).astype(np.int64)
    values = vec.flatten().to_numpy(zero_copy_only=False)  # null values become NaN
    return _Chunk(where, start, ids, names, lengths, values)


@dataclass
class _NpyInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # where the data starts


def _npy_info(loc: Location) -> _NpyInfo:
    """The header of an npy file (read from its first bytes; works on object stores too)."""
    try:
        with loc.fs.open_input_file(loc.path) as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported npy format version {version}")
            offset = f.tell()
    except (ValueError, OSError) as exc:
        raise DataError(f"{loc} is not a readable npy file ({str(exc).splitlines()[0]})") from None
    return _NpyInfo(tuple(shape), np.dtype(dtype), bool(fortran), int(offset))


def _npy_rows(loc: Location, info: _NpyInfo) -> Iterator[np.ndarray]:
    """The npy file's rows, BATCH_ROWS at a time: memory-mapped locally, streamed otherwise."""
    n, dim = info.shape
    if loc.is_local:
        try:
            arr = np.load(loc.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{loc} is not a readable npy file ({str(exc).splitlines()[0]})") from None
        for a in range(0, n, BATCH_ROWS):
            yield np.asarray(arr[a:a + BATCH_ROWS])
        return
    if info.fortran:
        raise DataError(f"{loc} is a Fortran-order npy file; save it in C order to import it from {loc.fs.type_name}")
    row_bytes = dim * info.dtype.itemsize
    with loc.fs.open_input_file(loc.path) as f:
        f.seek(info.offset)
        for a in range(0, n, BATCH_ROWS):
            rows = min(BATCH_ROWS, n - a)
            data = f.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise DataError(f"{loc} is truncated: its header says {n} rows")
            yield np.frombuffer(data, dtype=info.dtype).reshape(rows, dim)


@dataclass
class _ClipPart:
    npy: Location
    info: _NpyInfo
    meta: Location
    id_column: str
    name_column: str | None


def _clip_root(src: Location) -> Location:
    """The folder holding img_emb/ and metadata/: SOURCE itself or SOURCE/embeddings."""
    for root in (src, src / "embeddings"):
        if (root / "img_emb").exists():
            return root
    raise DataError(f"{src} is not clip-retrieval output: no img_emb/ or embeddings/img_emb/ folder in it")


def _numbered(folder: Location, kind: str, ext: str) -> dict[int, Location]:
    out = {}
    for loc in folder.list(ext):
        m = _PART.match(loc.name)
        if m and m.group(1) == kind:
            out[int(m.group(2))] = loc
    return out


def _plan_clip(src: Location, id_column: str | None, name_column: str | None) -> list[_ClipPart]:
    """Pair img_emb_i.npy with metadata_i.parquet and check both from their headers."""
    root = _clip_root(src)
    npys = _numbered(root / "img_emb", "img_emb", ".npy")
    metas = _numbered(root / "metadata", "metadata", ".parquet")
    if not npys:
        raise DataError(f"no img_emb_*.npy files in {root / 'img_emb'}")
    for i in sorted(set(npys) | set(metas)):
        if i not in metas:
            raise DataError(f"{npys[i]} has no metadata file {root / 'metadata' / f'metadata_{i}.parquet'}")
        if i not in npys:
            raise DataError(f"{metas[i]} has no embedding file {root / 'img_emb' / f'img_emb_{i}.npy'}")
    parts = []
    for i in sorted(npys):
        info = _npy_info(npys[i])
        if len(info.shape) != 2:
            raise DataError(f"{npys[i]} holds a {len(info.shape)}-d array {info.shape}; expected rows x dim")
        if info.dtype.kind != "f":
            raise DataError(f"{npys[i]} holds {info.dtype} values, not floats")
        pf = _open_parquet(metas[i])
        schema, rows = pf.schema_arrow, pf.metadata.num_rows
        pf.close()
        if rows != info.shape[0]:
            raise DataError(f"{metas[i]} has {rows} rows but {npys[i]} has {info.shape[0]}; "
                            "each metadata file must match its npy file row by row")
        id_col = id_column or next((c for c in CLIP_ID_COLUMNS if c in schema.names), None)
        if id_col is None or id_col not in schema.names:
            wanted = f"column '{id_column}'" if id_column else f"id column ({', '.join(CLIP_ID_COLUMNS)})"
            raise DataError(f"{metas[i]} has no {wanted} (columns: {_columns_hint(schema)}); "
                            "pass --id-column")
        if name_column is not None and name_column not in schema.names:
            raise DataError(f"{metas[i]} has no column '{name_column}' (columns: {_columns_hint(schema)})")
        name_col = name_column or (CLIP_NAME_COLUMN if CLIP_NAME_COLUMN in schema.names else None)
        parts.append(_ClipPart(npys[i], info, metas[i], id_col, name_col))
    return parts


def _read_clip(parts: list[_ClipPart]) -> Iterator[_Chunk]:
    for part in parts:
        where = str(part.npy)
        pf = _open_parquet(part.meta)
        cols = list(dict.fromkeys(c for c in (part.id_column, part.name_column) if c))
        rows = _npy_rows(part.npy, part.info)
        start = 0
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
                ids, names = _ids_names(str(part.meta), start, batch.column(part.id_column),
                                        batch.column(part.name_column) if part.name_column else None,
                                        part.id_column)
                mat = next(rows, None)
                if mat is None or len(mat) != len(ids):
                    raise DataError(f"{part.meta} and {part.npy} differ in rows near row {start}")
                lengths = np.full(len(ids), mat.shape[1], dtype=np.int64)
                yield _Chunk(where, start, ids, names, lengths, mat.reshape(-1), str(part.meta))
                start += batch.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{part.meta}: not readable near row {start} ({str(exc).splitlines()[0]})") from None
        finally:
            pf.close()


# --- validating and writing ------------------------------------------------------------------

@dataclass
class _Sink:
    """Checks every chunk (dimension, NaN/Inf, duplicate ids) and writes full shards to `stage`."""

    stage: RunDir
    model: str
    shard_size: int
    expected_dim: int | None
    dim: int | None = None
    first: str = ""
    rows: int = 0
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (file, row)
    files: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # every id, in order (for the images table)
    shards: dict[str, int] = field(default_factory=dict)
    _names: list[str] = field(default_factory=list)
    _mats: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0

    def add(self, c: _Chunk) -> None:
        n = len(c.ids)
        if n == 0:
            return
        id_where = c.id_where or c.where
        if not self.files or self.files[-1] != id_where:
            self.files.append(id_where)
        if self.dim is None:
            self.dim, self.first = int(c.lengths[0]), f"{c.where} row {c.start}"
            if self.dim <= 0:
                raise DataError(f"{self.first} (id {_short(c.ids[0])}): empty embedding")
            if self.expected_dim is not None and self.expected_dim != self.dim:
                raise DataError(
                    f"{c.where}: {self.dim}-d embeddings, but model {self.model} is "
                    f"{self.expected_dim}-d; pick the matching --model (or a new name for another model)"
                )
        bad = np.flatnonzero(c.lengths != self.dim)
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{c.where}: row {c.start + i} (id {_short(c.ids[i])}): {c.lengths[i]} "
                            f"values, but {self.first} has {self.dim}")
        with np.errstate(over="ignore", invalid="ignore"):
            mat = np.asarray(c.values, dtype=np.float32).reshape(n, self.dim)
        finite = np.isfinite(mat).all(axis=1)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            raise DataError(f"{c.where}: row {c.start + i} (id {_short(c.ids[i])}): embedding holds "
                            "NaN or Inf (or a null, or a value too large for float32)")
        file_no = len(self.files) - 1
        for i, image_id in enumerate(c.ids):
            prev = self.seen.setdefault(image_id, (file_no, c.start + i))
            if prev != (file_no, c.start + i):
                raise DataError(f"{id_where}: row {c.start + i}: duplicate id {_short(image_id)} "
                                f"(also {self.files[prev[0]]} row {prev[1]})")
        self.ids.extend(c.ids)
        self._names.extend(c.names)
        self._mats.append(mat)
        self._buffered += n
        self.rows += n
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def finish(self) -> None:
        if self._buffered:
            self._flush(self._buffered)

    def _flush(self, n: int) -> None:
        mat = np.concatenate(self._mats) if len(self._mats) > 1 else self._mats[0]
        first = len(self.ids) - self._buffered
        ids, names = self.ids[first:first + n], self._names[:n]
        index = len(self.shards)
        write_shard(self.stage, self.model, index, embeddings_table(ids, names, self.model, mat[:n]))
        self.shards[shard_name(index)] = n
        self._names = self._names[n:]
        self._mats = [mat[n:]] if n < len(mat) else []
        self._buffered -= n


def source_stamp(files: list[Location], options: dict) -> str:
    """What identifies an import's input without reading it again: each file's path, size and
    modification time, and the import's options (a sha256 of them, kept in the manifest)."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for loc in files:
        info = loc.fs.get_file_info(loc.path)
        digest.update(json.dumps([loc.path, info.size, info.mtime_ns]).encode())
    return digest.hexdigest()


def _imported_from(run: RunDir, model: str, stamp: str) -> Manifest | None:
    """The model's manifest when it is complete and was imported from the input of `stamp`."""
    try:
        manifest = read_manifest(run, model)
    except DataError:
        return None
    if manifest is None or manifest.processor.get("source_stamp") != stamp:
        return None
    return None if missing_or_resized(run, manifest) else manifest


def _has_embeddings(run: RunDir, model: str) -> bool:
    return bool(run.model_dir(model).list()) or run.meta_dir(model).exists()


def _detect_format(src: Location, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if src.is_file():
        return "parquet"
    if (src / "img_emb").exists() or (src / "embeddings" / "img_emb").exists():
        return "clip-retrieval"
    return "parquet"


def _remove_dead_stages(run: RunDir) -> None:
    """Delete the staging folders of imports that died (killed: their `finally` never ran).

    Called with the run's lock held, and an import holds that lock for as long as its staging
    folder exists, so every `import-*` folder found then belongs to a process that is gone.
    """
    dead = [d for d in run.staging.dirs()
            if d.name.startswith(STAGE_PREFIX) and re.fullmatch(r"[0-9a-f]{32}", d.name[len(STAGE_PREFIX):])]
    for d in dead:
        d.delete()
    if dead:
        log.info("removed %d staging folder(s) of imports that died, in %s", len(dead), run.staging)


def _remove_if_empty(loc: Location) -> None:
    if loc.is_local:
        with contextlib.suppress(OSError):
            os.rmdir(loc.path)


def _run_id_of(run: RunDir) -> str | None:
    """The run's id when it already has one (read only: a refused import writes nothing)."""
    from flagsim.shards import run_id

    return run_id(run) if (run.meta / "run.json").exists() else None


def import_embeddings(
    source: str,
    model: str,
    run_dir: str,
    *,
    fmt: str = "auto",
    id_column: str | None = None,
    name_column: str | None = None,
    vector_column: str | None = None,
    shard_size: int = 1000,
    force: bool = False,
    images: bool = True,
) -> EmbeddingsImport:
    """Write `source`'s embeddings as `embeddings/model=<model>/` shards plus a manifest (last).

    `source` is a Parquet file or folder (id, optional name and vector columns) or
    clip-retrieval's output (`img_emb/img_emb_i.npy` + `metadata/metadata_i.parquet`, as
    SOURCE/ or SOURCE/embeddings/). The input is read once, a batch at a time; every row is
    checked while its shards are written to a staging folder under `_tmp/`, and only when all
    of it is valid are the model's old embeddings (with `force`) replaced by the staged ones.
    A refused import leaves the run as it was. Memory: one shard, plus every id (for the
    duplicate check).
    """
    from flagsim.search.catalog import model_dim

    check_model_name(model)
    if shard_size < 1:
        raise ConfigError(f"shard size must be at least 1, got {shard_size}")
    src = Location.parse(source)
    if not src.exists():
        raise DataError(f"embeddings not found: {src}")
    kind = _detect_format(src, fmt)
    if kind == "clip-retrieval":
        if vector_column is not None:
            raise ConfigError("--vector-column is for Parquet input; clip-retrieval's vectors are its npy files")
        clip_parts = _plan_clip(src, id_column, name_column)
        chunks, nfiles = _read_clip(clip_parts), len(clip_parts)
        files = [f for p in clip_parts for f in (p.npy, p.meta)]
    else:
        pq_parts = _plan_parquet(src, id_column, name_column, vector_column)
        chunks, nfiles = _read_parquet(pq_parts), len(pq_parts)
        files = [p.loc for p in pq_parts]
    stamp = source_stamp(files, {"format": kind, "id_column": id_column, "name_column": name_column,
                                 "vector_column": vector_column, "shard_size": shard_size})
    run = RunDir.at(run_dir)
    if _has_embeddings(run, model) and not force:
        done = _imported_from(run, model, stamp)
        if done is not None:  # a rerun of the same import (e.g. after a kill that came too late)
            log.info("%s is up to date: already imported from the same %d file(s) of %s",
                     run.model_dir(model), nfiles, src)
            return EmbeddingsImport(model, done.rows, done.dim, len(done.shards),
                                    "kept" if run.images_table.exists() else "none", 0,
                                    up_to_date=True, format=kind, files=nfiles)
        raise DataError(
            f"{run.model_dir(model)} already holds embeddings of {model}; pass --force to replace them"
        )
    expected = model_dim(model)
    if expected is None:
        log.info("%s is not a registered model: importing as an external model", model)

    from flagsim.runlock import run_lock

    new_root, new_tmp = not run.root.exists(), not run.staging.exists()
    try:
        with run_lock(run.root, SOURCE_PREFIX):
            return _import_locked(run, src, model, kind, chunks, nfiles, shard_size, force,
                                  images, expected, stamp)
    finally:
        if new_tmp:
            _remove_if_empty(run.staging)
        if new_root:
            _remove_if_empty(run.root)


def _import_locked(run: RunDir, src: Location, model: str, kind: str, chunks: Iterator[_Chunk],
                   nfiles: int, shard_size: int, force: bool, images: bool,
                   expected: int | None, stamp: str) -> EmbeddingsImport:
    _remove_dead_stages(run)
    rid = _run_id_of(run) or uuid.uuid4().hex
    stage = RunDir(run.staging / f"{STAGE_PREFIX}{uuid.uuid4().hex}")
    try:
        (stage.meta / "run.json").write_json({"run_id": rid, "schema_version": SCHEMA_VERSION})
        sink = _Sink(stage, model, shard_size, expected)
        for chunk in chunks:
            sink.add(chunk)
        if sink.rows == 0:
            raise DataError(f"{src} holds no rows")
        sink.finish()
        if _has_embeddings(run, model) and not force:  # written meanwhile by someone without the lock
            raise DataError(
                f"{run.model_dir(model)} already holds embeddings of {model}; pass --force to replace them"
            )
        _commit(run, stage, model, rid, sink.shards)
    finally:
        stage.root.delete()
    images_state, not_in = _images_table(run, sink.ids, images)
    table = read_images_table(run.images_table) if run.images_table.exists() else None
    assert sink.dim is not None
    write_manifest(run, Manifest(
        model=model, dim=sink.dim, rows=sink.rows,
        images_hash=images_table_hash(table) if table is not None else "none",
        shards=sink.shards, dtype="float32", device="unknown", processor={"source_stamp": stamp},
        shard_size=shard_size, source=f"{SOURCE_PREFIX} {src.name}",
    ))
    log.info("imported %d %d-d embeddings of %s from %s into %s", sink.rows, sink.dim, model, src,
             run.model_dir(model))
    return EmbeddingsImport(model, sink.rows, sink.dim, len(sink.shards), images_state, not_in,
                            format=kind, files=nfiles)


def _commit(run: RunDir, stage: RunDir, model: str, rid: str, shards: dict[str, int]) -> None:
    """Replace the model's embeddings with the staged shards and markers (the manifest comes after).

    The old manifest goes first, so that a crash part-way leaves the model incomplete (refused
    on read), never a mix of old and new shards that passes for complete.
    """
    discard_model(run, model)
    if not (run.meta / "run.json").exists():
        (run.meta / "run.json").write_json({"run_id": rid, "schema_version": SCHEMA_VERSION})
    for name in shards:
        index = shard_index(name)
        assert index is not None
        for old, new in ((stage.shard(model, index), run.shard(model, index)),
                         (stage.shard_marker(model, index), run.shard_marker(model, index))):
            new.parent.mkdirs()
            new.fs.move(old.path, new.path)
