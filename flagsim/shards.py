"""Embedding shards and their per-model manifest: atomic writes, validated reads."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from flagsim import __version__
from flagsim.errors import DataError
from flagsim.rundir import RunDir, shard_index
from flagsim.schema import SCHEMA_VERSION, embedding_schema
from flagsim.storage import Location

log = logging.getLogger(__name__)


def embeddings_table(
    image_ids: list[str], names: list[str], model: str, vectors: np.ndarray
) -> pa.Table:
    """An embedding shard table from ids, names and an [N, dim] float32 matrix."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {vectors.shape}")
    n, dim = vectors.shape
    if not np.isfinite(vectors).all():
        bad = [image_ids[i] for i in np.where(~np.isfinite(vectors).all(axis=1))[0][:5]]
        raise DataError(f"model {model} produced NaN/Inf embeddings for {', '.join(bad)}")
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_arrays(
        [
            pa.array(image_ids, pa.string()),
            pa.array(names, pa.string()),
            pa.array([model] * n, pa.string()),
            emb,
        ],
        schema=embedding_schema(dim),
    )


def write_shard(run: RunDir, model: str, index: int, table: pa.Table) -> Location:
    """Write one shard atomically; its presence is its completion marker."""
    loc = run.shard(model, index)
    loc.write_parquet(table)
    return loc


def done_shards(run: RunDir, model: str) -> dict[int, Location]:
    """Shards already written for `model`, by shard index."""
    out = {}
    for loc in run.model_dir(model).list(".parquet"):
        idx = shard_index(loc.name)
        if idx is not None:
            out[idx] = loc
    return out


@dataclass
class Manifest:
    """What produced one model's shards; written last, so its presence means the model is done."""

    model: str
    dim: int
    rows: int
    images_hash: str
    shards: dict[str, int]
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
            return cls(**known)
        except TypeError as exc:
            raise DataError(f"{where} is not a valid manifest: {exc}") from exc


def write_manifest(run: RunDir, manifest: Manifest) -> Location:
    loc = run.manifest(manifest.model)
    loc.write_json(manifest.to_json())
    return loc


def read_manifest(run: RunDir, model: str) -> Manifest | None:
    loc = run.manifest(model)
    if not loc.exists():
        return None
    data = loc.read_json()
    if not isinstance(data, dict):
        raise DataError(f"{loc} is not a valid manifest")
    return Manifest.from_json(data, str(loc))


def iter_shards(run: RunDir, model: str, validate: bool = True) -> Iterator[tuple[Location, pa.Table]]:
    """Yield (location, table) of each shard of `model`, checking model name and dimension."""
    manifest = read_manifest(run, model)
    if manifest is None:
        if not run.model_dir(model).exists():
            raise DataError(f"no embeddings for model {model} in {run.root} (run `flagsim embed` first)")
        raise DataError(
            f"embeddings of model {model} in {run.model_dir(model)} are incomplete (no _manifest.json); "
            "rerun `flagsim embed` to finish them"
        )
    shards = done_shards(run, model)
    if validate:
        expected = set(manifest.shards)
        found = {loc.name for loc in shards.values()}
        if expected - found:
            missing = sorted(expected - found)[0]
            raise DataError(
                f"{run.model_dir(model) / missing} is listed in the manifest but missing; "
                f"repair with `flagsim embed --repair --models {model}`"
            )
    for _, loc in sorted(shards.items()):
        if validate and loc.name not in manifest.shards:
            raise DataError(
                f"{loc} is not listed in {run.manifest(model)}; "
                f"repair with `flagsim embed --repair --models {model}`"
            )
        table = loc.read_parquet()
        if validate:
            _check_shard(table, loc, model, manifest)
        yield loc, table


def _check_shard(table: pa.Table, loc: Location, model: str, manifest: Manifest) -> None:
    hint = f"; repair with `flagsim embed --repair --models {model}`"
    for col in ("image_id", "name", "model", "embedding"):
        if col not in table.column_names:
            raise DataError(f"{loc} is not an embedding shard (no '{col}' column){hint}")
    typ = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(typ):
        raise DataError(f"{loc}: 'embedding' is not a fixed-size list{hint}")
    if typ.list_size != manifest.dim:
        raise DataError(
            f"{loc}: embedding dim {typ.list_size} disagrees with the manifest's {manifest.dim}{hint}"
        )
    models = set(table.column("model").unique().to_pylist())
    if models - {model}:
        raise DataError(f"{loc} holds embeddings of model(s) {', '.join(sorted(models))}, not {model}{hint}")
    expected = manifest.shards.get(loc.name)
    if expected is not None and expected != table.num_rows:
        raise DataError(
            f"{loc} has {table.num_rows} rows but the manifest says {expected}{hint}"
        )


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
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


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
