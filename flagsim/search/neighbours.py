"""The batch neighbour table: top-k of every image for every model, written in bounded batches."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flagsim.config import Config
from flagsim.errors import DataError
from flagsim.rundir import RunDir, shard_name
from flagsim.schema import NEIGHBOURS_FILE_SCHEMA, NEIGHBOURS_SCHEMA, PARTITION_KEY
from flagsim.search.catalog import resolve_models
from flagsim.search.load import load_index
from flagsim.shards import iter_shards, read_manifest, vectors_of
from flagsim.storage import Location

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class NeighboursResult:
    model: str
    queries: int
    rows: int
    parts: int
    k: int
    index_kind: str
    seconds: float
    path: str


def neighbour_table(
    model: str, query_ids: Sequence[str], query_names: Sequence[str], scores: np.ndarray,
    pos: np.ndarray, ids: np.ndarray, names: np.ndarray,
) -> pa.Table:
    """One part's rows (NEIGHBOURS_FILE_SCHEMA) from search results (missing hits, -1, left out)."""
    nq, k = pos.shape
    valid = pos >= 0
    qi = np.repeat(np.arange(nq), k).reshape(nq, k)[valid]
    ranks = np.tile(np.arange(1, k + 1, dtype=np.int32), nq).reshape(nq, k)[valid]
    p = pos[valid]
    qids = np.asarray(query_ids, dtype=object)
    qnames = np.asarray(query_names, dtype=object)
    return pa.Table.from_arrays(
        [
            pa.array(qids[qi].tolist() if len(p) else [], pa.string()),
            pa.array(qnames[qi].tolist() if len(p) else [], pa.string()),
            pa.array(ranks, pa.int32()),
            pa.array(ids[p].tolist() if len(p) else [], pa.string()),
            pa.array(names[p].tolist() if len(p) else [], pa.string()),
            pa.array(scores[valid].astype(np.float32), pa.float32()),
        ],
        schema=NEIGHBOURS_FILE_SCHEMA,
    )


def write_neighbours(
    run_dir: str, k: int | None = None, models: Sequence[str] | None = None,
    cfg: Config | None = None,
) -> list[NeighboursResult]:
    """Write `neighbours/model=<name>/part-*.parquet` for each model (the image itself excluded).

    Query vectors are streamed from the shards `neighbours.batch_size` at a time, so memory is
    the index plus one batch. Each model's old parts are replaced; the manifest (`_meta/neighbours/`) is last.
    """
    cfg = cfg or Config()
    k = k if k is not None else cfg.neighbours.k
    batch_size = cfg.neighbours.batch_size
    run = RunDir.at(run_dir)
    names = resolve_models(run, models)
    for m in names:  # check k everywhere before building or writing anything
        emb = read_manifest(run, m)
        if emb is not None and k > emb.rows - 1:
            raise DataError(
                f"k={k} is larger than the collection: model {m} has {emb.rows} images, "
                f"so at most {emb.rows - 1} neighbours each"
            )
    indexes = {m: load_index(run, m, cfg.index) for m in names}
    for idx in indexes.values():
        idx.check_k(k)
    out = []
    for m, idx in indexes.items():
        start = time.perf_counter()
        target = run.neighbours_dir(m)
        old = target.list(".parquet")
        manifest_loc = run.neighbours_manifest(m)
        manifest_loc.delete()  # first: until the new one is written, the table is incomplete
        parts = 0
        rows = 0
        queries = 0
        written: set[str] = set()
        for qids, qnames, qvec in _batches(run, m, batch_size):
            scores, pos = idx.search(qvec, k, exclude=qids, normalised=False)
            table = neighbour_table(m, qids, qnames, scores, pos, idx.ids, idx.names)
            loc = target / shard_name(parts)
            loc.write_parquet(table, staging=run.staging)
            written.add(loc.name)
            parts += 1
            rows += table.num_rows
            queries += len(qids)
        for loc in old:
            if loc.name not in written:
                loc.delete()
        seconds = time.perf_counter() - start
        assert idx.manifest is not None
        manifest_loc.write_json({
            "model": m, "k": k, "queries": queries, "rows": rows, "parts": parts,
            "index_kind": idx.manifest.kind, "index_recall": idx.manifest.recall,
            "seconds": round(seconds, 3),
        })
        log.info("%s: %d neighbours of %d images -> %s (%.2fs)", m, rows, queries, target, seconds)
        out.append(NeighboursResult(m, queries, rows, parts, k, idx.manifest.kind, seconds, str(target)))
    return out


def _batches(run: RunDir, model: str, batch_size: int):
    """(ids, names, vectors) in batches of at most `batch_size` rows, streamed from the shards."""
    ids: list[str] = []
    names: list[str] = []
    vecs: list[np.ndarray] = []
    n = 0
    for _, table in iter_shards(run, model):
        v = vectors_of(table)
        tid = table.column("image_id").to_pylist()
        tname = table.column("name").to_pylist()
        start = 0
        while start < len(tid):
            take = min(batch_size - n, len(tid) - start)
            ids.extend(tid[start:start + take])
            names.extend(tname[start:start + take])
            vecs.append(v[start:start + take])
            n += take
            start += take
            if n == batch_size:
                yield ids, names, np.concatenate(vecs)
                ids, names, vecs, n = [], [], [], 0
    if n:
        yield ids, names, np.concatenate(vecs)


def read_neighbours(run_dir: str, model: str) -> pa.Table:
    """The neighbour table of `model` (all parts, in order), its model as the first column."""
    run = RunDir.at(run_dir)
    target: Location = run.neighbours_dir(model)
    if not run.neighbours_manifest(model).exists():
        raise DataError(f"no neighbour table for model {model} in {run.root} (run `flagsim neighbours`)")
    parts = [loc.read_parquet().select(NEIGHBOURS_FILE_SCHEMA.names).cast(NEIGHBOURS_FILE_SCHEMA)
             for loc in target.list(".parquet")]
    table = pa.concat_tables(parts) if parts else NEIGHBOURS_FILE_SCHEMA.empty_table()
    column = pa.array([model] * table.num_rows, pa.string())
    return table.add_column(0, pa.field(PARTITION_KEY, pa.string(), nullable=False), column).cast(
        NEIGHBOURS_SCHEMA)
