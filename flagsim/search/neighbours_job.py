"""The neighbours job on Ray Data: query shards read as a dataset, search actors per index part."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from flagsim.config import IndexConfig
from flagsim.errors import FlagsimError
from flagsim.rundir import RunDir
from flagsim.schema import NEIGHBOUR_ROWS_SCHEMA as ROWS_SCHEMA
from flagsim.search.backend import merge_topk, set_threads
from flagsim.search.manifest import IndexManifest

log = logging.getLogger(__name__)

# columns carried through the stream (besides the neighbour table's own)
SHARD, ROW, EXPECTED, VECTOR, SCORES, POSITIONS = (
    "shard", "row", "expected", "vector", "scores", "positions")


@dataclass(frozen=True)
class JobPlan:
    """One table's job: the query shards to do, the index's parts and the actors to run."""

    run_uri: str
    model: str  # a model or `all`
    members: tuple[str, ...]  # the ensemble's models (empty for a model)
    shards: tuple[str, ...]  # query shard files to search
    k: int
    parts: int  # index parts (a stage of actors each)
    index_cfg: IndexConfig
    num_actors: int  # actors per part
    batch_size: int
    index_identity: str  # the index planned for (an actor finding another one refuses it)
    query_run_uri: str | None = None  # where the query shards are (default: the index's run)
    exclude_self: bool = True  # drop each query's own id from its results (neighbour tables)
    dim: int = 0  # the vectors' dimension (0: unknown)
    shard_rows: int = 0  # the most rows of one query shard (0: unknown)
    buffer_mb: float | None = None  # neighbours.buffer_mb (None: from dim and shard_rows)


#: bytes of one neighbour row in a result batch (ids, names, rank, score): for the budget only
ROW_BYTES = 96
MIN_BUFFER_BYTES = 64 * 2**20


def buffer_bytes(plan: JobPlan) -> int | None:
    """The object-store bytes the job may hold at once: query shards read ahead, batches between
    the index parts' stages and result rows the driver has not taken yet.

    `neighbours.buffer_mb` when set, else (actors + 3) query shards' worth (vectors and rows),
    at least 64 MiB; None (Ray Data's own limit) when the shards' size is unknown. Without it
    the read tasks, much faster than the search, queue every shard in the object store, and
    the pages the driver maps grow with the collection.
    """
    if plan.buffer_mb is not None:
        return int(plan.buffer_mb * 2**20)
    if plan.dim <= 0 or plan.shard_rows <= 0:
        return None
    per_shard = plan.shard_rows * (4 * plan.dim + ROW_BYTES * (plan.k + 1))
    return max(MIN_BUFFER_BYTES, (plan.parts * plan.num_actors + 3) * per_shard)


#: the memory a read task's worker needs besides its shard: Python, Ray, pyarrow and numpy.
#: Ray Data measured 214 MiB for a worker reading 10k x 256 shards, and it warns when a task
#: uses more than it reserved. A reservation for Ray's scheduler only (nothing is allocated).
READ_BASE_BYTES = 256 * 2**20


def read_memory_bytes(plan: JobPlan) -> int:
    """The memory a read task reserves from Ray: its worker plus one query shard's table and
    vectors twice (the Arrow column and the unit float32 rows it becomes)."""
    per_shard = 2 * plan.shard_rows * 4 * max(plan.dim, 0)
    return READ_BASE_BYTES + per_shard


def index_identity(manifest: IndexManifest) -> str:
    """Which saved index a part was searched in: its build time, size and files' checksums."""
    key = {"created": manifest.created, "count": manifest.count, "kind": manifest.kind,
           "files": {n: f.get("sha256") for n, f in sorted(manifest.files.items())}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def read_shard(batch: dict[str, np.ndarray], run_uri: str, model: str,
               members: Sequence[str]) -> dict[str, np.ndarray]:
    """A read task: the query shards named in `batch` as rows (ids, names, unit vectors)."""
    from flagsim.search.source import source_of

    src = source_of(RunDir.at(run_uri), model, list(members) or None)
    out: dict[str, list] = {SHARD: [], ROW: [], EXPECTED: [], "query_id": [], "query": [],
                            VECTOR: []}
    for shard in batch[SHARD]:
        block = src.read(str(shard))
        n = len(block.ids)
        out[SHARD].append(np.full(n, str(shard), dtype=object))
        out[ROW].append(np.arange(n, dtype=np.int64))
        out[EXPECTED].append(np.full(n, n, dtype=np.int64))
        out["query_id"].append(np.asarray(block.ids, dtype=object))
        out["query"].append(np.asarray(block.names, dtype=object))
        out[VECTOR].append(block.vectors.astype(np.float32))
    return {key: np.concatenate(v) for key, v in out.items()}


class SearchActor:
    """Holds one part of a saved index (loaded once, memory-mapped; on GPU when it has one).

    Each batch's running top-(k+1) (`scores`, `positions`, global positions) is merged with
    this part's exactly; the actor of the last part also drops each query itself (as
    `ModelIndex.search` does) and emits the neighbour table's rows.
    """

    def __init__(self, run_uri: str, model: str, part: int, parts: int, k: int,
                 index_cfg: IndexConfig, threads: int, identity: str,
                 exclude_self: bool = True) -> None:
        # A flagsim error is raised by the first call, not here: Ray keeps the error of a task
        # (the driver shows its one line) but only the text of an actor's failed constructor.
        self.error: FlagsimError | None = None
        self.exclude_self = exclude_self
        try:
            self._load(run_uri, model, part, parts, k, index_cfg, threads, identity)
        except FlagsimError as exc:
            self.error = exc

    def _load(self, run_uri: str, model: str, part: int, parts: int, k: int,
              index_cfg: IndexConfig, threads: int, identity: str) -> None:
        from flagsim.errors import DataError
        from flagsim.search.manifest import IDS_FILE, file_problem, read_index_manifest
        from flagsim.search.saved import load_parts

        self.threads = set_threads(threads)
        run = RunDir.at(run_uri)
        manifest = read_index_manifest(run, model)
        if manifest is None or index_identity(manifest) != identity:
            raise DataError(f"the index of model {model} in {run.root} was replaced while the "
                            "neighbours job ran; rerun `flagsim neighbours`")
        gpu = _has_gpu()
        self.index = load_parts(run, model, manifest, index_cfg, parts=[part], gpu=gpu, verify=True)
        self.k, self.kk = k, min(k + (1 if self.exclude_self else 0), manifest.count)
        self.first, self.last = part == 0, part == parts - 1
        self.ids = self.names = self.pos = None
        if self.last:
            root = run.index_path(model)
            problem = file_problem(root, manifest, IDS_FILE, verify=True)
            if problem:
                raise DataError(f"{problem}; rerun `flagsim index --models {model}`")
            table = (root / IDS_FILE).read_parquet()
            # Arrow arrays: the rows' neighbour ids and names are gathered with `take`, without
            # a Python string per hit
            self.ids = table.column("image_id").combine_chunks()
            self.names = table.column("name").combine_chunks()
            self.pos = {i: p for p, i in enumerate(self.ids.to_pylist())}
        log.info("%s: index part %d/%d loaded (%d vectors, %s)", model, part + 1, parts,
                 self.index.count, self.index.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | pa.Table:
        if self.error is not None:
            raise self.error
        # OpenMP's thread count is a per-thread setting, and Ray Data may call this method on
        # another thread than the constructor's (where a new thread starts from Ray's
        # OMP_NUM_THREADS=<num_cpus>): set it where the search runs.
        set_threads(self.threads)
        vectors = np.ascontiguousarray(batch[VECTOR], dtype=np.float32)
        n = len(vectors)
        found = self.index.search(vectors, min(self.kk, max(self.index.count, 1)))
        if self.first:
            scores, pos = found
        else:
            scores, pos = merge_topk([(batch[SCORES], batch[POSITIONS]), found], [0, 0], self.kk)
        if pos.shape[1] < self.kk:  # this part (so far) has fewer vectors than k+1
            pad = self.kk - pos.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
            pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
        if not self.last:
            out = {key: batch[key] for key in batch if key not in (SCORES, POSITIONS)}
            out[SCORES] = scores.astype(np.float32)
            out[POSITIONS] = pos.astype(np.int64)
            return out
        from flagsim.search.model_index import finish_hits

        assert self.pos is not None
        excl = np.array([self.pos.get(q, -2) for q in batch["query_id"]], dtype=np.int64) \
            if self.exclude_self else None
        scores, pos = finish_hits(scores, pos.astype(np.int64), excl, self.k)
        return neighbour_rows(batch, scores, pos, self.ids, self.names) if n else _empty_rows()


def _has_gpu() -> bool:
    """Whether Ray gave this actor a GPU (then FAISS searches on it); False outside Ray, where
    `ray.get_gpu_ids()` would start a local Ray only to answer."""
    try:
        import ray

        return ray.is_initialized() and bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside Ray (or no GPU support): the CPU
        return False


def _empty_rows() -> pa.Table:
    return ROWS_SCHEMA.empty_table()


def neighbour_rows(batch: dict[str, np.ndarray], scores: np.ndarray, pos: np.ndarray,
                   ids: pa.Array, names: pa.Array) -> pa.Table:
    """The neighbour table's rows of a batch (ROWS_SCHEMA), missing hits left out; a query
    without any hit keeps one rank-0 row so that its shard is known complete (dropped when the
    part is written). Every string column is gathered with Arrow's `take` (a null position
    gives a null id and name)."""
    nq, k = pos.shape
    valid = pos >= 0
    empty = ~valid.any(axis=1)
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), (nq, 1))
    if empty.any():  # rank 0, position -1: a placeholder
        valid[empty, 0] = True
        rank[empty, 0] = 0
    qi = pa.array(np.nonzero(valid)[0])
    p = pos[valid]
    hits = pa.array(p, pa.int64(), mask=p < 0)

    def queries(column: str) -> pa.Array:
        return pa.array(batch[column], pa.string()).take(qi)

    return pa.Table.from_arrays(
        [
            queries(SHARD),
            pa.array(np.asarray(batch[ROW]), pa.int64()).take(qi),
            pa.array(np.asarray(batch[EXPECTED]), pa.int64()).take(qi),
            queries("query_id"),
            queries("query"),
            pa.array(rank[valid], pa.int32()),
            ids.take(hits).cast(pa.string()),
            names.take(hits).cast(pa.string()),
            pa.array(scores[valid].astype(np.float32), pa.float32()),
        ],
        schema=ROWS_SCHEMA,
    )


def actor_resources(resources: dict[str, float], actors: int, use_gpu: bool, read_cpus: float
                    ) -> tuple[float, float, int]:
    """(CPUs, GPUs, FAISS threads) per search actor so that `actors` of them fit the cluster
    beside one read task: a whole GPU each when there are enough, else a share."""
    cpus = float(resources.get("CPU", 1.0))
    gpus = float(resources.get("GPU", 0.0)) if use_gpu else 0.0
    per_cpu = min(1.0, max(cpus - min(read_cpus, 1.0), 0.25) / actors)
    per_gpu = 0.0 if gpus < 1 else min(1.0, gpus / actors)
    threads = max(1, int(cpus // actors))
    return round(per_cpu, 3), round(per_gpu, 3), threads


def with_object_store_limit(limits: Any, budget: int) -> Any:
    """A copy of Ray Data's `ExecutionResources` limits with `object_store_memory=budget`."""
    if dataclasses.is_dataclass(limits):  # older Rays: a plain dataclass, copy() takes no overrides
        return dataclasses.replace(limits, object_store_memory=budget)
    return limits.copy(object_store_memory=budget)


def run_job(plan: JobPlan, resources: dict[str, float], use_gpu: bool, read_cpus: float,
            on_batch: Callable[[pa.Table], None]) -> None:
    """Stream `plan` through Ray Data, handing every batch of neighbour rows to `on_batch`."""
    import ray

    from flagsim.pipeline.ray_session import quiet_ray_data

    quiet_ray_data()
    actors = plan.parts * plan.num_actors
    cpus, gpus, threads = actor_resources(resources, actors, use_gpu, read_cpus)
    items = [{SHARD: s} for s in plan.shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # A task operator of its own: fused into the search actors, one task would bundle a whole
    # search batch of shard names (all the shards, typically), so nothing would be written
    # before the end. Ray Data fuses two operators only when their remote arguments agree, and
    # the search actors reserve no memory: the read task's reservation keeps them apart (the
    # SIGKILL test of tests/test_neighbours_job.py fails when they fuse).
    ds = ds.map_batches(read_shard, batch_size=1, batch_format="numpy",
                        fn_kwargs={"run_uri": plan.query_run_uri or plan.run_uri, "model": plan.model,
                                   "members": list(plan.members)},
                        num_cpus=min(read_cpus, 1.0), memory=read_memory_bytes(plan))
    for part in range(plan.parts):
        ds = ds.map_batches(
            SearchActor,
            fn_constructor_kwargs={"run_uri": plan.run_uri, "model": plan.model, "part": part,
                                   "parts": plan.parts, "k": plan.k, "index_cfg": plan.index_cfg,
                                   "threads": threads, "identity": plan.index_identity,
                                   "exclude_self": plan.exclude_self},
            batch_size=plan.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
            num_cpus=cpus, num_gpus=gpus,
        )
    budget = buffer_bytes(plan)
    if budget is not None:  # this dataset's own context: other jobs of the process keep theirs
        opts = ds.context.execution_options
        opts.resource_limits = with_object_store_limit(opts.resource_limits, budget)
    log.info("%s: %d query shard(s), %d index part(s) x %d actor(s) (%g CPU, %g GPU each), "
             "buffer %s", plan.model, len(plan.shards), plan.parts, plan.num_actors, cpus, gpus,
             "Ray Data's default" if budget is None else f"{budget / 2**20:.0f} MiB")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            on_batch(batch)
    except Exception as exc:
        cause = flagsim_cause(exc)
        if cause is None:
            raise
        raise type(cause)(f"neighbours {plan.model}: {cause}") from None


def flagsim_cause(exc: BaseException) -> FlagsimError | None:
    """The flagsim error (a DataError in an actor or task) behind an error Ray raised, if any.

    Ray Data re-raises a UDF's error as a UserCodeException that keeps only its text, so the
    error is found by its type's name in that text (`flagsim.errors.DataError: <message>`).
    """
    import re

    from flagsim import errors

    if isinstance(exc, FlagsimError) and type(exc).__module__.startswith("flagsim"):
        return exc
    found = re.findall(r"^flagsim\.errors\.(\w+): (.+)$", str(exc), flags=re.MULTILINE)
    for name, message in reversed(found):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, FlagsimError):
            return cls(message.strip())
    return None
