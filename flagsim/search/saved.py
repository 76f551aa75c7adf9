"""A saved index: its freshness (by the checksums recorded at write time) and its files, mmap'd."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence

from flagsim.config import IndexConfig
from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.search.backend import FaissIndex, PartedIndex, VectorIndex, gpu_capable, use_gpu
from flagsim.search.catalog import ENSEMBLE, complete_models, model_order
from flagsim.search.manifest import (
    IDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    IndexManifest,
    file_problem,
    read_index_manifest,
    requested,
    sha256_of,
)
from flagsim.search.model_index import ModelIndex
from flagsim.shards import read_manifest

log = logging.getLogger(__name__)


def index_files(manifest: IndexManifest) -> list[str]:
    """The FAISS files of an index, in part order (older manifests: the one `index.faiss`)."""
    return [p["file"] for p in manifest.parts] or [INDEX_FILE]


def source_checksums(run: RunDir, model: str, models: Sequence[str] | None = None) -> dict[str, str]:
    """Checksums of the vectors `model`'s index is built from, as recorded when each shard was
    written (the embedding manifests): nothing is re-read or re-hashed."""
    if model == ENSEMBLE:
        out: dict[str, str] = {}
        for m in (list(models) if models else complete_models(run)):
            emb = read_manifest(run, m)
            if emb is None:
                raise DataError(f"no embeddings for model {m} in {run.root}")
            out.update({f"{m}/{s}": h for s, h in emb.checksums.items()})
        return out
    emb = read_manifest(run, model)
    if emb is None:
        raise DataError(f"no embeddings for model {model} in {run.root}")
    return dict(emb.checksums)


def index_state(
    run: RunDir, model: str, cfg: IndexConfig | None = None, *, verify: bool = False,
    models: Sequence[str] | None = None,
) -> tuple[str, str]:
    """("fresh" | "missing" | "stale", reason) of the saved index of `model`.

    Stale: an index file differs in size from its manifest (in sha256 too with `verify`), a
    source shard was added, removed or rewritten (its recorded checksum changed), the embedding
    dim changed, the ensemble's models changed, or `cfg` (when given) asks for other settings.
    """
    root = run.index_path(model)
    manifest = read_index_manifest(run, model)
    if manifest is None:
        return "missing", f"no index at {root}"
    for name in [*index_files(manifest), IDS_FILE]:
        problem = file_problem(root, manifest, name, verify=verify)
        if problem:
            return "stale", problem
    where = root / MANIFEST_FILE
    if model == ENSEMBLE:
        now = model_order(models) if models else complete_models(run)
        if sorted(now) != sorted(manifest.source_models):
            return "stale", f"{where} is stale: the ensemble was built over other models"
        if now != list(manifest.source_models):  # built before the order was fixed
            return "stale", (f"{where} is stale: its vectors join the models in another order "
                             f"({', '.join(manifest.source_models)}) than flagsim's ({', '.join(now)})")
    else:
        emb = read_manifest(run, model)
        if emb is not None and emb.dim != manifest.dim:
            return "stale", f"{where} is stale: embeddings are now {emb.dim}-d, the index {manifest.dim}-d"
        rows = sum(int(r) for r in emb.shards.values()) if emb is not None else manifest.count
        if emb is not None and rows != manifest.count:
            return "stale", (f"{where} is stale: the embeddings now hold {rows} rows, the index "
                             f"{manifest.count}")
    hashes = source_checksums(run, model, manifest.source_models if model == ENSEMBLE and not models
                              else models)
    added = sorted(set(hashes) - set(manifest.shards))
    removed = sorted(set(manifest.shards) - set(hashes))
    changed = sorted(s for s in set(hashes) & set(manifest.shards) if hashes[s] != manifest.shards[s])
    for what, names in (("changed", changed), ("was added", added), ("was removed", removed)):
        if names:
            shard = names[0] if model != ENSEMBLE else names[0].split("/", 1)[1]
            owner = model if model != ENSEMBLE else names[0].split("/", 1)[0]
            return "stale", (
                f"{where} is stale: source shard {run.model_dir(owner) / shard} {what} "
                "since the index was built"
            )
    if verify:  # the source shards' bytes too (streamed): a shard replaced behind the manifest
        for key, digest in sorted(hashes.items()):
            owner, shard = key.split("/", 1) if model == ENSEMBLE else (model, key)
            loc = run.model_dir(owner) / shard
            if not loc.exists() or sha256_of(loc) != digest:
                return "stale", (f"{where} is stale: source shard {loc} does not match the checksum "
                                 "recorded when it was written")
    if cfg is not None and requested(cfg) != manifest.requested:
        return "stale", f"{where} was built with other index settings"
    return "fresh", f"{root} is up to date"


def _cache_dir(run: RunDir) -> str:
    """Where index files of an object-store run are copied to be memory-mapped."""
    return os.path.join(tempfile.gettempdir(), "flagsim-index-cache")


def load_parts(run: RunDir, model: str, manifest: IndexManifest, cfg: IndexConfig,
               parts: Sequence[int] | None = None, *, gpu: bool | None = None,
               verify: bool = False) -> VectorIndex:
    """The index's parts (all, or the ones listed), memory-mapped; one FaissIndex or a
    PartedIndex merging them. `verify`: each file's sha256 too (streamed), not only its size."""
    root = run.index_path(model)
    on_gpu = (use_gpu(cfg) if gpu is None else gpu) and gpu_capable(manifest.kind)
    records = manifest.parts or [{"file": INDEX_FILE, "offset": 0, "count": manifest.count}]
    chosen = [records[i] for i in parts] if parts is not None else records
    loaded: list[FaissIndex] = []
    for rec in chosen:
        loc = root / rec["file"]
        problem = file_problem(root, manifest, rec["file"], verify=verify)
        if problem:
            raise DataError(f"{problem}; rerun `flagsim index --models {model}`")
        index = FaissIndex.load(loc.local_file(_cache_dir(run)), manifest.kind, manifest.params,
                                gpu=on_gpu)
        if index.dim != manifest.dim or index.count != int(rec["count"]):
            raise DataError(
                f"{loc} holds {index.count} x {index.dim} vectors but its manifest says "
                f"{rec['count']} x {manifest.dim}"
            )
        loaded.append(index)
    if len(loaded) == 1 and int(chosen[0]["offset"]) == 0:
        return loaded[0]
    return PartedIndex(loaded, [int(r["offset"]) for r in chosen])


def open_index(run: RunDir, model: str, manifest: IndexManifest, cfg: IndexConfig,
                verify: bool = False) -> ModelIndex:
    root = run.index_path(model)
    index = load_parts(run, model, manifest, cfg, verify=verify)
    problem = file_problem(root, manifest, IDS_FILE, verify=verify)
    if problem:
        raise DataError(f"{problem}; rerun `flagsim index --models {model}`")
    table = (root / IDS_FILE).read_parquet()
    if table.column_names[:2] != ["image_id", "name"] or table.num_rows != manifest.count:
        raise DataError(f"{root / IDS_FILE} does not match the index ({table.num_rows} ids)")
    return ModelIndex(model, index, table.column("image_id"), table.column("name"), manifest, root)
