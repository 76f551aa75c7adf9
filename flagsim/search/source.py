"""Vectors to index or to query, read shard by shard: one model's embeddings, or the ensemble's."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.search.catalog import ENSEMBLE
from flagsim.search.vectors import ensemble_vectors, normalise
from flagsim.shards import (
    Manifest,
    iter_shards,
    read_manifest,
    repair_hint,
    shard_files,
    shard_problem,
    shared_rows,
    vectors_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """One shard's rows: ids, display names and L2-normalised vectors."""

    shard: str  # the shard file name (part-NNNNN.parquet), the unit of resume
    ids: list[str]
    names: list[str]
    vectors: np.ndarray  # [rows, dim] float32, unit rows


def _shard_vectors(loc, table: pa.Table, dim: int) -> np.ndarray:
    vec = vectors_of(table)
    if vec.shape[1] != dim:
        raise DataError(f"{loc}: embedding dim {vec.shape[1]} disagrees with the manifest's {dim}")
    if not np.isfinite(vec).all():
        raise DataError(f"{loc} holds NaN/Inf embeddings")
    return normalise(vec, source=str(loc))


@dataclass(frozen=True)
class _IdsNames:
    ids: pa.ChunkedArray
    names: pa.ChunkedArray


class ModelSource:
    """The verified embedding shards of one model, in shard order."""

    def __init__(self, run: RunDir, model: str) -> None:
        manifest = read_manifest(run, model)
        if manifest is None:
            next(iter_shards(run, model), None)  # raises the clear "no embeddings" error
            raise DataError(f"no embeddings for model {model} in {run.root}")
        if manifest.model != model:
            raise DataError(f"{run.manifest(model)} describes model {manifest.model}, not {model}")
        self.run, self.model, self.manifest = run, model, manifest

    @property
    def name(self) -> str:
        return self.model

    @property
    def rows(self) -> int:
        """The rows of the shards as the manifest lists them (each read checks its own count);
        not the manifest's total, which an edit could make disagree and size an index wrongly."""
        return sum(int(r) for r in self.manifest.shards.values())

    @property
    def dim(self) -> int:
        return int(self.manifest.dim)

    @property
    def shards(self) -> list[str]:
        return sorted(self.manifest.shards)

    def checksums(self) -> dict[str, str]:
        """shard file -> sha256 recorded when it was written (the embedding manifest)."""
        return dict(self.manifest.checksums)

    def shard_rows(self) -> dict[str, int]:
        return {s: int(r) for s, r in self.manifest.shards.items()}

    def read(self, shard: str) -> Block:
        """One shard, verified (rows, run id, sha256) as every read of a shard is."""
        loc = self.run.model_dir(self.model) / shard
        if shard not in self.manifest.shards:
            raise DataError(f"{loc} is not listed in the manifest of model {self.model}")
        if not loc.exists():
            raise DataError(f"{loc} is listed in the manifest but missing{repair_hint(self.model)}")
        problem, table = shard_problem(self.run, self.model, loc, self.manifest)
        if problem:
            raise DataError(f"{loc} {problem}{repair_hint(self.model)}")
        assert table is not None
        return Block(shard, table.column("image_id").to_pylist(), table.column("name").to_pylist(),
                     _shard_vectors(loc, table, self.dim))

    def names_table(self) -> _IdsNames:
        """The `image_id` and `name` columns of every shard (only those two are read)."""
        ids, names = [], []
        for shard in self.shards:
            t = (self.run.model_dir(self.model) / shard).read_parquet(columns=["image_id", "name"])
            ids.append(t.column("image_id"))
            names.append(t.column("name"))
        return _IdsNames(pa.chunked_array(ids, pa.string()), pa.chunked_array(names, pa.string()))

    def __iter__(self) -> Iterator[Block]:
        """Every shard, after checking the shard files are exactly the manifest's."""
        found = {loc.name for loc in shard_files(self.run, self.model).values()}
        extra = sorted(found - set(self.manifest.shards))
        if extra:
            raise DataError(f"{self.run.model_dir(self.model) / extra[0]} is not listed in "
                            f"{self.run.manifest(self.model)}{repair_hint(self.model)}")
        for shard in self.shards:
            yield self.read(shard)


class EnsembleSource:
    """Mean cosine over several models as one vector set (see `ensemble_vectors`).

    Shards are aligned by file name (every `flagsim embed` run shards all models the same way);
    an image takes part when every model has it in that shard, in the first model's order.
    The models are kept in `catalog.model_order` (the order their vectors are concatenated in).
    """

    def __init__(self, run: RunDir, models: Sequence[str]) -> None:
        from flagsim.search.catalog import model_order

        self.models = model_order(models)
        if len(self.models) < 2:
            raise DataError("the ensemble needs at least two models")
        self.run = run
        self.parts = [ModelSource(run, m) for m in self.models]

    @property
    def name(self) -> str:
        return ENSEMBLE

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.parts)

    @property
    def shards(self) -> list[str]:
        common = set(self.parts[0].shards)
        for p in self.parts[1:]:
            common &= set(p.shards)
        return sorted(common)

    def checksums(self) -> dict[str, str]:
        return {f"{p.model}/{s}": h for p in self.parts for s, h in p.checksums().items()}

    def _kept(self, shard: str, columns: Sequence[str]) -> pa.Table:
        """The first model's `columns` of `shard` (`image_id` among them) for the rows whose id
        every model has in that shard, in the first model's order; only those columns are read."""
        return shared_rows(self.run, self.models, shard, columns)

    @cached_property
    def _kept_rows(self) -> dict[str, int]:
        return {shard: self._kept(shard, ["image_id"]).num_rows for shard in self.shards}

    @property
    def rows(self) -> int:
        return sum(self._kept_rows.values())

    def shard_rows(self) -> dict[str, int]:
        return dict(self._kept_rows)

    def shortfall(self, count: int) -> str | None:
        """A warning when the ensemble's `count` rows are fewer than its smallest model's: its
        models hold other images, or the same images in shard files of other names (embedded
        or imported with another shard size), which line up only partly."""
        fewest = min(self.parts, key=lambda p: p.rows)
        if count >= fewest.rows:
            return None
        embedded = [p for p in self.parts if p.manifest.source == "flagsim embed"]
        if len({p.manifest.images_hash for p in embedded}) > 1:
            return (f"the ensemble {ENSEMBLE} of {', '.join(self.models)} holds {count} images, "
                    f"fewer than {fewest.model}'s {fewest.rows}: its models were embedded from "
                    "different images tables of this run (`flagsim embed --images` with some "
                    "of the models); embed them all from the current one")
        return (f"the ensemble {ENSEMBLE} of {', '.join(self.models)} holds {count} images, "
                f"fewer than {fewest.model}'s {fewest.rows}: an image takes part when every "
                "model has it in the shard file of the same name, so models sharded differently "
                "(e.g. imported with another --shard-size) line up only partly")

    def ids_names(self) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
        """Ids and names of the ensemble's rows in `read` order (only those columns are read)."""
        tables = [self._kept(shard, ["image_id", "name"]) for shard in self.shards]
        ids = [t.column("image_id") for t in tables]
        names = [t.column("name") for t in tables]
        return (pa.chunked_array([c for col in ids for c in col.chunks], pa.string()),
                pa.chunked_array([c for col in names for c in col.chunks], pa.string()))

    def read(self, shard: str) -> Block:
        blocks = [p.read(shard) for p in self.parts]
        keep = set(blocks[0].ids)
        for b in blocks[1:]:
            keep &= set(b.ids)
        order = [i for i in blocks[0].ids if i in keep]
        names = dict(zip(blocks[0].ids, blocks[0].names, strict=True))
        per_model = {}
        for p, b in zip(self.parts, blocks, strict=True):
            pos = {i: r for r, i in enumerate(b.ids)}
            per_model[p.model] = b.vectors[[pos[i] for i in order]]
        vec = ensemble_vectors(per_model) if order else np.zeros((0, self.dim), np.float32)
        return Block(shard, order, [names[i] for i in order], vec)

    def __iter__(self) -> Iterator[Block]:
        for shard in self.shards:
            yield self.read(shard)


VectorSource = ModelSource | EnsembleSource


def source_of(run: RunDir, model: str, models: Sequence[str] | None = None) -> VectorSource:
    """The vectors of `model`, or of the ensemble of `models` when `model` is `all`."""
    if model == ENSEMBLE:
        from flagsim.search.catalog import complete_models

        return EnsembleSource(run, list(models) if models else complete_models(run))
    return ModelSource(run, model)


def manifest_of(source: VectorSource) -> Manifest:
    """The embedding manifest of a model source (the first model's for the ensemble)."""
    return source.manifest if isinstance(source, ModelSource) else source.parts[0].manifest
