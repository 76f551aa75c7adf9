"""Embedding shards, their completion markers and per-model manifest: atomic writes, verified reads."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from flagsim import __version__
from flagsim.errors import DataError
from flagsim.rundir import RunDir, shard_index
from flagsim.schema import (
    META_DIM,
    META_MODEL,
    META_SHARD,
    SCHEMA_VERSION,
    embedding_schema,
)
from flagsim.storage import Location

log = logging.getLogger(__name__)


def embeddings_table(
    image_ids: list[str], names: list[str], model: str, vectors: np.ndarray
) -> pa.Table:
    """An embedding shard table from ids, names and an [N, dim] float32 matrix.

    The model and dimension travel as the file's key-value metadata, not as columns: the
    model is the `model=<name>` folder (a Hive partition) when the table is read whole.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {vectors.shape}")
    n, dim = vectors.shape
    if not np.isfinite(vectors).all():
        bad = [image_ids[i] for i in np.where(~np.isfinite(vectors).all(axis=1))[0][:5]]
        raise DataError(f"model {model} produced NaN/Inf embeddings for {', '.join(bad)}")
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32), pa.int32())
    emb = pa.ListArray.from_arrays(offsets, flat, type=pa.list_(pa.float32()))
    return pa.Table.from_arrays(
        [pa.array(image_ids, pa.string()), pa.array(names, pa.string()), emb],
        schema=embedding_schema(dim, model=model),
    )


# --- the run's identity ----------------------------------------------------------------------

def run_id(run: RunDir) -> str:
    """This run directory's id (created on first use): stamped into every shard it writes."""
    loc = run.meta / "run.json"
    if loc.exists():
        try:
            data = loc.read_json()
        except DataError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("run_id"), str) and data["run_id"]:
            return data["run_id"]
        raise DataError(f"{loc} is not a valid run file; repair with `flagsim embed --repair`")
    rid = uuid.uuid4().hex
    loc.write_json({"run_id": rid, "schema_version": SCHEMA_VERSION})
    return rid


def repair_run_id(run: RunDir) -> str | None:
    """Rewrite a damaged `_meta/run.json` with the id its manifests and shard markers carry.

    Returns what was done (None: the file was fine or absent). With no recorded id a new one is
    made (every shard then counts as another run's and is redone); with several, the manifests'
    most common one is kept (shards of the others are redone by the repair that follows).
    """
    loc = run.meta / "run.json"
    if not loc.exists():
        return None
    try:
        run_id(run)
        return None
    except DataError:
        pass
    seen: Counter[str] = Counter()
    folder = run.meta / "embeddings"
    for model_dir in folder.dirs() if folder.exists() else []:
        model = model_dir.name.partition("=")[2]
        try:
            manifest = read_manifest(run, model)
        except DataError:
            manifest = None
        if manifest is not None and isinstance(manifest.run_id, str) and manifest.run_id:
            seen[manifest.run_id] += 1_000_000  # a manifest outweighs any number of markers
        markers = model_dir / "shards"
        for loc_marker in markers.list(".json") if markers.exists() else []:
            idx = shard_index(loc_marker.name.replace(".json", ".parquet"))
            marker = read_marker(run, model, idx) if idx is not None else None
            if marker is not None and isinstance(marker.get("run_id"), str):
                seen[marker["run_id"]] += 1
    rid, how = (seen.most_common(1)[0][0], "the id its manifests and shards record") if seen \
        else (uuid.uuid4().hex, "a new id (none was recorded)")
    loc.write_json({"run_id": rid, "schema_version": SCHEMA_VERSION})
    return f"{loc} was damaged; rewritten with {how}"


# --- shards and their completion markers -----------------------------------------------------

def write_shard(run: RunDir, model: str, index: int, table: pa.Table) -> Location:
    """Write one shard atomically, then its completion marker (rows, bytes, sha256).

    A shard counts as done only with a marker that matches the file, so a crash between the
    two writes, a truncated file or a file copied in from elsewhere is redone, never trusted.
    """
    loc = run.shard(model, index)
    meta = dict(table.schema.metadata or {})
    meta.setdefault(META_MODEL, model.encode())  # a table made for another model stays so
    meta[META_SHARD] = str(index).encode()
    # the run id goes in the marker, not the file: the same rows give the same bytes in any run
    data = loc.write_parquet(table.replace_schema_metadata(meta), staging=run.staging)
    run.shard_marker(model, index).write_json(
        {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
         "run_id": run_id(run)}
    )
    return loc


def shard_files(run: RunDir, model: str) -> dict[int, Location]:
    """Every shard-named file in the model's folder, by shard index (done or not)."""
    out = {}
    for loc in run.model_dir(model).list(".parquet"):
        idx = shard_index(loc.name)
        if idx is not None:
            out[idx] = loc
    return out


def read_marker(run: RunDir, model: str, index: int) -> dict[str, Any] | None:
    """The completion marker of shard `index`, or None when absent or unreadable."""
    loc = run.shard_marker(model, index)
    if not loc.exists():
        return None
    try:
        data = loc.read_json()
    except DataError:
        return None
    ok = isinstance(data, dict) and all(isinstance(data.get(k), t) for k, t in
                                        (("rows", int), ("bytes", int), ("sha256", str)))
    return data if ok else None


def done_shards(run: RunDir, model: str, verify: bool = False) -> dict[int, Location]:
    """Shards already written for `model`: file present with a marker of the same size.

    With `verify`, each file's sha256 is checked against its marker too (reads every shard).
    """
    out = {}
    rid = run_id(run) if (run.meta / "run.json").exists() else None  # a query: never create it
    for idx, loc in shard_files(run, model).items():
        marker = read_marker(run, model, idx)
        if marker is None or not loc.is_file() or loc.size() != marker["bytes"]:
            continue
        if rid is not None and marker.get("run_id") not in (None, rid):
            continue  # a marker copied in from another run
        if verify and hashlib.sha256(loc.read_bytes()).hexdigest() != marker["sha256"]:
            continue
        out[idx] = loc
    return out


@dataclass
class Manifest:
    """What produced one model's shards; written last, so its presence means the model is done."""

    model: str
    dim: int
    rows: int
    images_hash: str
    shards: dict[str, int]  # shard file -> rows
    checksums: dict[str, str] = field(default_factory=dict)  # shard file -> sha256 of its bytes
    sizes: dict[str, int] = field(default_factory=dict)  # shard file -> bytes (a listing checks them)
    run_id: str | None = None
    checkpoint: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    processor: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    images_per_s: float | None = None
    errors: int = 0
    shard_size: int | None = None
    source: str = "flagsim embed"
    flagsim_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Manifest:
        try:
            known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            manifest = cls(**known)
        except TypeError as exc:
            raise DataError(f"{where} is not a valid manifest: {exc}") from exc
        if not all(isinstance(m, dict) for m in (manifest.shards, manifest.checksums, manifest.sizes)):
            raise DataError(f"{where} is not a valid manifest: 'shards' is not a mapping")

        def count(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        redo = f"; re-embed with `flagsim embed --force --models {data.get('model', 'M')}`"
        if not count(manifest.dim) or manifest.dim < 1 or not count(manifest.rows):
            raise DataError(f"{where} is not a valid manifest: 'dim' and 'rows' must be whole "
                            f"numbers (dim {manifest.dim!r}, rows {manifest.rows!r}){redo}")
        if not all(count(n) for n in (*manifest.shards.values(), *manifest.sizes.values())):
            raise DataError(f"{where} is not a valid manifest: a shard's row count is not a whole "
                            f"number{redo}")
        return manifest


def write_manifest(run: RunDir, manifest: Manifest) -> Location:
    """Write the manifest last; checksums not given are taken from the shards' markers."""
    for name in manifest.shards:
        if name not in manifest.checksums or name not in manifest.sizes:
            idx = shard_index(name)
            marker = read_marker(run, manifest.model, idx) if idx is not None else None
            if marker is None:
                if name in manifest.checksums:
                    continue
                raise DataError(f"{run.model_dir(manifest.model) / name} has no completion marker; "
                                "it was not written by flagsim")
            manifest.checksums.setdefault(name, marker["sha256"])
            manifest.sizes.setdefault(name, marker["bytes"])
    manifest.run_id = manifest.run_id or run_id(run)
    loc = run.manifest(manifest.model)
    loc.write_json(manifest.to_json())
    return loc


def shared_rows(run: RunDir, models: Sequence[str], shard: str,
                columns: Sequence[str] = ("image_id",)) -> pa.Table:
    """The first model's `columns` of `shard` (`image_id` among them) for the rows whose id
    every model has in its shard file of that name, in the first model's order (how the
    ensemble lines models up); of the others only `image_id` is read."""
    table = (run.model_dir(models[0]) / shard).read_parquet(columns=list(columns))
    for m in models[1:]:
        other = (run.model_dir(m) / shard).read_parquet(columns=["image_id"])
        table = table.filter(pc.is_in(table.column("image_id"),
                                      value_set=other.column("image_id").combine_chunks()))
    return table


def missing_or_resized(run: RunDir, manifest: Manifest) -> list[str]:
    """The manifest's shards that are gone from the model's folder or no longer have the size
    they were written with (truncated, replaced): one listing, nothing read. Sizes are checked
    where the manifest records them (older manifests record only checksums)."""
    folder = run.model_dir(manifest.model)
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    sizes = {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}
    return [name for name in manifest.shards if name not in sizes
            or (name in manifest.sizes and sizes[name] != manifest.sizes[name])]


def read_manifest(run: RunDir, model: str) -> Manifest | None:
    loc = run.manifest(model)
    if not loc.exists():
        return None
    data = loc.read_json()
    if not isinstance(data, dict):
        raise DataError(f"{loc} is not a valid manifest")
    return Manifest.from_json(data, str(loc))


def discard_model(run: RunDir, model: str) -> None:
    """Delete a model's shards and sidecars, the manifest first (the model is then incomplete)."""
    for loc in (run.manifest(model), run.legacy_manifest(model), run.model_dir(model),
                run.meta_dir(model)):
        loc.delete()


def repair_hint(model: str) -> str:
    return f"; repair with `flagsim embed --repair --models {model}`"


def shard_problem(
    run: RunDir, model: str, loc: Location, manifest: Manifest | None, dim: int | None = None
) -> tuple[str | None, pa.Table | None]:
    """(what is wrong with shard file `loc`, or None; its table when it parsed).

    The one check behind both reads (`iter_shards`, which refuses) and `flagsim embed --repair`
    (which deletes and redoes), so every error that says "repair" is one that repair fixes.
    """
    try:
        data = loc.read_bytes()
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        return f"is not a readable Parquet file ({str(exc).splitlines()[0]})", None
    meta = table.schema.metadata or {}
    if "embedding" not in table.column_names or "image_id" not in table.column_names:
        return "is not an embedding shard (no 'embedding' or 'image_id' column)", None
    written_as = meta.get(META_MODEL, b"").decode(errors="replace")
    if written_as != model:
        return f"holds embeddings of model {written_as or 'unknown'}, not {model}", table
    index = shard_index(loc.name)
    marker = read_marker(run, model, index) if index is not None else None
    if manifest is not None and manifest.run_id and marker is not None \
            and marker.get("run_id") not in (None, manifest.run_id):
        return "was written by another run", table
    want = dim if dim is not None else (manifest.dim if manifest is not None else None)
    got = _dim_of(table)
    if want is not None and got is not None and got != want:
        return f"has embedding dim {got}, but the manifest's is {want}", table
    if manifest is not None:
        expected = manifest.shards.get(loc.name)
        if expected is not None and expected != table.num_rows:
            return f"has {table.num_rows} rows but the manifest says {expected}", table
        checksum = manifest.checksums.get(loc.name)
        if checksum and hashlib.sha256(data).hexdigest() != checksum:
            return "does not match the checksum recorded when it was written (changed on disk)", table
    return None, table


def _dim_of(table: pa.Table) -> int | None:
    meta = table.schema.metadata or {}
    if META_DIM in meta:
        return int(meta[META_DIM])
    typ = table.schema.field("embedding").type
    return typ.list_size if pa.types.is_fixed_size_list(typ) else None


def no_manifest_error(run: RunDir, model: str, holder: str = "") -> DataError:
    """Why `model` has no manifest, as one line: a layout-1 run (re-embed with --force), no
    embeddings at all, or embeddings still being written (`holder`: the run lock's holder,
    when another process is writing them) or cut short."""
    if run.legacy_manifest(model).exists():
        return DataError(
            f"{run.model_dir(model)} was written by an older flagsim (layout 1, sidecars inside "
            f"the table folder); re-embed it with `flagsim embed --force --models {model}`"
        )
    if not run.model_dir(model).exists():
        return DataError(f"no embeddings for model {model} in {run.root} (run `flagsim embed` first)")
    return DataError(
        f"embeddings of model {model} in {run.model_dir(model)} are incomplete (no manifest); "
        + (f"{holder}: wait for it" if holder else "rerun `flagsim embed` to finish them")
    )


def iter_shards(run: RunDir, model: str, validate: bool = True) -> Iterator[tuple[Location, pa.Table]]:
    """Yield (location, table) of each shard of `model`, verified against its manifest.

    Verified: the set of shard files equals the manifest's, and each file's model, dimension,
    row count and sha256 are the ones recorded when it was written.
    """
    manifest = read_manifest(run, model)
    hint = repair_hint(model)
    if manifest is None:
        raise no_manifest_error(run, model)
    shards = shard_files(run, model)
    if validate:
        found = {loc.name for loc in shards.values()}
        missing = sorted(set(manifest.shards) - found)
        if missing:
            raise DataError(f"{run.model_dir(model) / missing[0]} is listed in the manifest but missing{hint}")
        extra = sorted(found - set(manifest.shards))
        if extra:
            raise DataError(f"{run.model_dir(model) / extra[0]} is not listed in {run.manifest(model)}{hint}")
    for _, loc in sorted(shards.items()):
        if validate:
            problem, table = shard_problem(run, model, loc, manifest)
            if problem:
                raise DataError(f"{loc} {problem}{hint}")
        else:
            table = loc.read_parquet()
        assert table is not None
        yield loc, table


@dataclass(frozen=True)
class EmbeddingSet:
    """All embeddings of one model in a run, in shard order."""

    model: str
    ids: list[str]
    names: list[str]
    vectors: np.ndarray  # [N, dim] float32, as stored (not normalised)
    manifest: Manifest

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def vectors_of(table: pa.Table) -> np.ndarray:
    """The [N, dim] float32 matrix of a shard's `embedding` column (list or fixed-size list)."""
    col = table.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        dim = col.type.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        dim = _dim_of(table) or (int(lengths[0]) if len(lengths) else 0)
        if len(lengths) and (lengths != dim).any():
            raise DataError(f"embeddings of {len(lengths)} rows are not all {dim}-d")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False) if dim else np.zeros((0, 0), np.float32)


def read_embeddings(run: RunDir, model: str) -> EmbeddingSet:
    """Read and validate every shard of `model` into memory."""
    ids: list[str] = []
    names: list[str] = []
    mats: list[np.ndarray] = []
    manifest = read_manifest(run, model)
    for _, table in iter_shards(run, model):
        ids.extend(table.column("image_id").to_pylist())
        names.extend(table.column("name").to_pylist())
        mats.append(vectors_of(table))
    assert manifest is not None  # iter_shards raised otherwise
    vectors = np.concatenate(mats) if mats else np.zeros((0, manifest.dim), np.float32)
    if len(set(ids)) != len(ids):
        raise DataError(f"embeddings of model {model} hold duplicate image ids")
    return EmbeddingSet(model, ids, names, vectors, manifest)
