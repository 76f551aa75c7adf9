"""The batch neighbour tables: top-k of every image for every model and the ensemble, resumable."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flagsim.config import Config
from flagsim.errors import ConfigError, DataError
from flagsim.rundir import RunDir
from flagsim.schema import NEIGHBOURS_FILE_SCHEMA, NEIGHBOURS_SCHEMA, PARTITION_KEY
from flagsim.search.build_tasks import Table, ensure_indexes
from flagsim.search.catalog import search_tables
from flagsim.search.manifest import IndexManifest
from flagsim.search.model_index import check_k
from flagsim.search.neighbours_job import JobPlan, index_identity, run_job
from flagsim.search.saved import index_files, source_checksums
from flagsim.shards import read_manifest
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
    recall: float | None = None  # the index's measured recall@recall_k (1.0 for exact)
    recall_k: int | None = None
    written: int = 0  # parts written by this call (0: the table was up to date)


# --- where things are ------------------------------------------------------------------------

def part_marker(run: RunDir, model: str, shard: str) -> Location:
    """Completion marker of one part: `_meta/neighbours/model=<m>/parts/part-NNNNN.json`."""
    return run.neighbours_manifest(model).parent / "parts" / shard.replace(".parquet", ".json")


def staged_parts(run: RunDir, model: str) -> Location:
    """Where `flagsim neighbours` writes a table's new parts until all are done:
    `_tmp/neighbours/model=<m>/`. The table folder holds only complete tables, never a mix of
    an old table's parts (another k, index or embeddings) and new ones."""
    return run.staging / "neighbours" / f"model={model}"


def shard_checksum(checksums: dict[str, str], shard: str, members: Sequence[str]) -> str:
    """The sha256 of query shard `shard` as its embedding manifest records it (the ensemble:
    one hash over its models' records of that shard)."""
    if not members:
        return checksums.get(shard, "")
    joined = ",".join(f"{m}/{shard}={checksums.get(f'{m}/{shard}', '')}" for m in members)
    return hashlib.sha256(joined.encode()).hexdigest()


def largest_shard(run: RunDir, model: str, members: Sequence[str]) -> int:
    """The most rows of one query shard of a table (from the embedding manifests; 0 if none)."""
    rows = [n for m in (members or [model]) if (man := read_manifest(run, m)) is not None
            for n in man.shards.values()]
    return max(rows, default=0)


# --- one table's plan ------------------------------------------------------------------------

@dataclass
class TablePlan:
    """What one neighbour table needs: its index, its query shards, which are done."""

    model: str
    members: tuple[str, ...]  # the ensemble's models; empty for a model
    index: IndexManifest
    shards: list[str]  # every query shard, in order
    sources: dict[str, str]  # query shard -> its checksum
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard -> its marker

    @property
    def todo(self) -> list[str]:
        return [s for s in self.shards if s not in self.done]


def table_indexes(run: RunDir, tables: Sequence[Table], cfg: Config) -> dict[str, IndexManifest]:
    """The manifest of each table's saved index, built first where missing or stale: as Ray
    tasks (`build_tasks.ensure_indexes`), since the search that follows runs on Ray too."""

    return {b.model: b.manifest
            for b in ensure_indexes(run, tables, cfg, on_ray=True, on_settings=False)}


def _marker_ok(run: RunDir, model: str, shard: str, k: int, index: str, source: str
               ) -> dict[str, Any] | None:
    """The part's marker when it vouches for the part, staged (written, not yet published: it
    is the newer) or in the table folder."""
    return vouched_part(part_marker(run, model, shard), staged_parts(run, model),
                        run.neighbours_dir(model), shard, k, index, source)


def vouched_part(marker_loc: Location, stage: Location, table_dir: Location, shard: str, k: int,
                 index: str, source: str) -> dict[str, Any] | None:
    """The part's marker when it vouches for the part staged in `stage` (written, not yet
    published: the newer) or in `table_dir`."""
    return (marker_matches(marker_loc, stage / shard, k, index, source)
            or marker_matches(marker_loc, table_dir / shard, k, index, source))


def marker_matches(marker_loc: Location, part: Location, k: int, index: str, source: str
                   ) -> dict[str, Any] | None:
    """The part's completion marker when it vouches for `part` as it is (same k, index and
    query shard; a file of the size written), else None."""
    if not marker_loc.exists():
        return None
    try:
        marker = marker_loc.read_json()
    except DataError:
        return None
    if not isinstance(marker, dict) or marker.get("k") != k or marker.get("index") != index \
            or marker.get("source") != source:
        return None
    if not part.is_file() or part.size() != marker.get("bytes"):
        return None
    return marker


def query_shards(checksums: dict[str, str], members: Sequence[str]) -> list[str]:
    """The query shards of a table: a model's shards, or those every ensemble member has."""
    if not members:
        return sorted(checksums)
    return sorted(set.intersection(*({s.split("/", 1)[1] for s in checksums if s.startswith(f"{m}/")}
                                     for m in members)))


def plan_table(run: RunDir, model: str, members: tuple[str, ...], k: int, index: IndexManifest
               ) -> TablePlan:
    check_k(k, model, index.count)
    checksums = source_checksums(run, model, list(members) or None)
    shards = query_shards(checksums, members)
    sources = {s: shard_checksum(checksums, s, members) for s in shards}
    plan = TablePlan(model, members, index, shards, sources)
    ident = index_identity(index)
    for s in shards:
        marker = _marker_ok(run, model, s, k, ident, sources[s])
        if marker is not None:
            plan.done[s] = marker
    return plan


def table_problem(run: RunDir, model: str, members: Sequence[str] = ()) -> str | None:
    """Why the written neighbour table of `model` (or `all` over `members`) is not the one
    `flagsim neighbours` would write now, or None when it is: a part missing, changed or made
    from other embeddings or another index. Reads the manifests and part markers, no part."""
    from flagsim.search.catalog import ENSEMBLE, model_order
    from flagsim.search.manifest import read_index_manifest
    from flagsim.search.saved import index_state

    loc = run.neighbours_manifest(model)
    if not loc.exists():
        return "not written"
    try:
        manifest = loc.read_json()
        k = int(manifest["k"])
    except (DataError, KeyError, TypeError, ValueError):
        return f"{loc} is not a valid manifest"
    members = tuple(model_order(members)) if model == ENSEMBLE else ()
    if model == ENSEMBLE and list(manifest.get("source_models") or []) != list(members):
        return "made over other models"
    index = read_index_manifest(run, model)
    state = index_state(run, model, models=list(members) or None)[0] if index else "missing"
    if index is None or state != "fresh":
        return f"made with an index that is now {state}"
    try:
        plan = plan_table(run, model, members, k, index)
    except DataError as exc:
        return str(exc)
    if plan.todo:
        return f"{len(plan.todo)} of its {len(plan.shards)} parts missing or out of date"
    return None


# --- the driver's writer ---------------------------------------------------------------------

@dataclass
class _Pending:
    expected: int
    seen: set[int] = field(default_factory=set)
    chunks: list[pa.Table] = field(default_factory=list)


class PartWriter:
    """Collects streamed neighbour rows by query shard; when every query of a shard has
    arrived, writes its part atomically, then its completion marker.

    Rows are keyed by (shard, row), so a batch Ray retries can never give a query twice.
    """

    def __init__(self, run: RunDir, plan: TablePlan, k: int, table_dir: Location | None = None,
                 marker_dir: Location | None = None) -> None:
        """Parts go to `table_dir` (default: the run's neighbours/model=<m>/), markers to
        `marker_dir` (default: beside the table's manifest)."""
        self.run, self.plan, self.k = run, plan, k
        self.table_dir = table_dir or run.neighbours_dir(plan.model)
        self.marker_dir = marker_dir or part_marker(run, plan.model, "x").parent
        self.ident = index_identity(plan.index)
        self.todo = set(plan.todo)
        self.pending: dict[str, _Pending] = {}
        self.written: list[str] = []

    def add(self, batch: pa.Table) -> None:
        if batch.num_rows == 0:
            return
        shards = batch.column("shard")
        names = pc.unique(shards).to_pylist()
        for shard in names:
            sub = batch if len(names) == 1 else batch.filter(pc.equal(shards, shard))
            if shard not in self.todo:  # written already: a retried duplicate
                continue
            pend = self.pending.get(shard)
            if pend is None:
                pend = self.pending[shard] = _Pending(int(sub.column("expected")[0].as_py()))
            rows = np.unique(sub.column("row").to_numpy())
            new = rows[[r not in pend.seen for r in rows.tolist()]]
            if len(new) < len(rows):
                sub = sub.filter(pc.is_in(sub.column("row"), pa.array(new)))
            pend.seen.update(new.tolist())
            pend.chunks.append(sub)
            if len(pend.seen) >= pend.expected:
                self._flush(shard)

    def _flush(self, shard: str) -> None:
        pend = self.pending.pop(shard)
        table = pa.concat_tables(pend.chunks).sort_by([("row", "ascending"), ("rank", "ascending")])
        self._write(shard, table.filter(pc.greater(table.column("rank"), 0)), pend.expected)

    def _write(self, shard: str, table: pa.Table, queries: int) -> None:
        table = table.select(NEIGHBOURS_FILE_SCHEMA.names).cast(NEIGHBOURS_FILE_SCHEMA)
        data = (self.table_dir / shard).write_parquet(
            table, staging=self.run.staging)
        marker = {"rows": table.num_rows, "queries": queries, "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "k": self.k, "index": self.ident,
                  "source": self.plan.sources[shard]}
        (self.marker_dir / shard.replace(".parquet", ".json")).write_json(marker)
        self.plan.done[shard] = marker
        self.todo.discard(shard)
        self.written.append(shard)

    def finish(self) -> None:
        """After a stream that ended without error: a shard none of whose rows came had no
        queries (an ensemble shard with no image common to all models): its part is empty."""
        if self.pending:
            raise DataError(f"{self.plan.model}: the neighbours job ended with incomplete "
                            f"part(s) {', '.join(sorted(self.pending)[:3])}; rerun to resume")
        for shard in sorted(self.todo):
            self._write(shard, NEIGHBOURS_FILE_SCHEMA.empty_table(), 0)


# --- the public entry ------------------------------------------------------------------------

def write_neighbours(
    run_dir: str, k: int | None = None, models: Sequence[str] | None = None,
    cfg: Config | None = None,
) -> list[NeighboursResult]:
    """Write `neighbours/model=<name>/part-NNNNN.parquet` for each model (the image itself
    excluded): one part per query shard, each with a completion marker, the manifest last.

    Tables: every complete model when `models` is None (or `["all"]`), plus the ensemble `all`
    when there are two or more; with an explicit list, those models, plus `all` (over them)
    only when the list names it. Indexes missing or stale are built first. Parts whose marker
    matches (same k, same index, same query shard) are kept; the rest are searched by the Ray
    Data job (`neighbours_job`) on the session of `pipeline/ray_session.py`, which is not
    started at all when nothing is left to do.
    """
    cfg = cfg or Config()
    k = k if k is not None else cfg.neighbours.k
    run = RunDir.at(run_dir)
    tables = search_tables(run, models)
    for m, members in tables:  # check k everywhere before building or writing anything
        emb = read_manifest(run, m) if not members else None
        if emb is not None:
            check_k(k, m, emb.rows)
    indexes = table_indexes(run, tables, cfg)
    from flagsim.runlock import run_lock

    # one writer per run: a second neighbours (or an embed) fails at once naming the holder;
    # two jobs on one small cluster would each hold a search actor and starve the other's reads
    with run_lock(run.root, "flagsim neighbours"):
        plans = [plan_table(run, m, members, k, indexes[m]) for m, members in tables]
        resources: dict[str, float] | None = None
        out = []
        for plan in plans:
            start = time.perf_counter()
            writer = PartWriter(run, plan, k, table_dir=staged_parts(run, plan.model))
            if plan.todo:
                if resources is None:
                    from flagsim.pipeline.ray_session import ensure_ray

                    resources = ensure_ray(cfg)
                run.neighbours_manifest(plan.model).delete()  # until the new one: incomplete
                _search(run, plan, k, cfg, resources, writer)
            published = _publish(run, plan, k)
            _remove_old_parts(run, plan)
            seconds = time.perf_counter() - start
            out.append(_commit(run, plan, k, seconds, published))  # every part written is staged
    return out


def _search(run: RunDir, plan: TablePlan, k: int, cfg: Config, resources: dict[str, float],
            writer: PartWriter) -> None:
    from flagsim.search.backend import gpu_capable

    job = JobPlan(run_uri=str(run.root), model=plan.model, members=plan.members,
                  shards=tuple(plan.todo), k=k, parts=len(index_files(plan.index)),
                  index_cfg=cfg.index, num_actors=cfg.neighbours.num_actors,
                  batch_size=cfg.neighbours.batch_size, index_identity=index_identity(plan.index),
                  dim=plan.index.dim, shard_rows=largest_shard(run, plan.model, plan.members),
                  buffer_mb=cfg.neighbours.buffer_mb)
    has_gpu = resources.get("GPU", 0.0) >= 1
    if cfg.index.use_gpu == "yes" and not has_gpu:
        raise ConfigError("index.use_gpu is yes but the Ray cluster has no GPU")
    gpu = cfg.index.use_gpu != "no" and has_gpu and gpu_capable(plan.index.kind)
    log.info("%s: searching %d of %d query shard(s) (%d kept)", plan.model, len(plan.todo),
             len(plan.shards), len(plan.done))
    run_job(job, resources, gpu, cfg.ray.read_cpus, writer.add)
    writer.finish()


def _publish(run: RunDir, plan: TablePlan, k: int) -> int:
    """Move the table's staged parts into its folder (see `publish_staged`)."""
    return publish_staged(staged_parts(run, plan.model), run.neighbours_dir(plan.model),
                          part_marker(run, plan.model, "x").parent, plan, k)


def publish_staged(stage: Location, table_dir: Location, marker_dir: Location, plan: TablePlan,
                   k: int) -> int:
    """Move a table's staged parts from `stage` into `table_dir`, each replacing the old part
    of its query shard (a rename each on local disk: the folder is mixed only for those
    instants, and a crash among them is finished by the next run, whose markers in
    `marker_dir` vouch for either place). A staged file its marker does not vouch for (stopped
    before its marker; another k) is deleted. Returns the number of parts moved."""
    ident, moved = index_identity(plan.index), 0
    for loc in stage.list(".parquet"):
        marker = marker_dir / loc.name.replace(".parquet", ".json")
        if loc.name in plan.done and marker_matches(marker, loc, k, ident, plan.sources[loc.name]):
            loc.move_to(table_dir / loc.name)
            moved += 1
        else:
            loc.delete()
    stage.delete()
    if not stage.parent.list() and not stage.parent.dirs():  # no table staged any more
        stage.parent.delete()
    return moved


def _remove_old_parts(run: RunDir, plan: TablePlan) -> None:
    """Parts (and markers) of query shards no longer in the run; leftovers of older layouts."""
    keep = set(plan.shards)
    for loc in run.neighbours_dir(plan.model).list(".parquet"):
        if loc.name not in keep:
            loc.delete()
    for loc in part_marker(run, plan.model, "x").parent.list(".json"):
        if loc.name.replace(".json", ".parquet") not in keep:
            loc.delete()


def _commit(run: RunDir, plan: TablePlan, k: int, seconds: float, written: int
            ) -> NeighboursResult:
    """Write the table's manifest (last: it marks the table complete) unless it is current."""
    index = plan.index
    queries = sum(int(plan.done[s].get("queries", 0)) for s in plan.shards)
    rows = sum(int(plan.done[s]["rows"]) for s in plan.shards)
    manifest = {
        "model": plan.model, "k": k, "queries": queries, "rows": rows, "parts": len(plan.shards),
        "index": index_identity(index), "index_kind": index.kind, "index_recall": index.recall,
        "recall_k": index.recall_k, "recall_sample": index.recall_sample,
        "source_models": list(plan.members) or [plan.model],
        "part_sha256": {s: plan.done[s]["sha256"] for s in plan.shards},
    }
    loc = run.neighbours_manifest(plan.model)
    old = loc.read_json() if loc.exists() else None
    same = isinstance(old, dict) and {key: old.get(key) for key in manifest} == manifest
    if written or not same:
        manifest["seconds"] = round(seconds, 3)
        loc.write_json(manifest)
    target = run.neighbours_dir(plan.model)
    if written:
        log.info("%s: %d neighbours of %d images -> %s (%d part(s) written, %.2fs)", plan.model,
                 rows, queries, target, written, seconds)
    else:
        log.info("%s: neighbour table up to date (%s)", plan.model, target)
    return NeighboursResult(plan.model, queries, rows, len(plan.shards), k, index.kind, seconds,
                            str(target), index.recall, index.recall_k, written)


def read_neighbours(run_dir: str, model: str) -> pa.Table:
    """The neighbour table of `model` (or `all`; every part, in order), its model first."""
    run = RunDir.at(run_dir)
    if not run.neighbours_manifest(model).exists():
        raise DataError(f"no neighbour table for model {model} in {run.root} (run `flagsim neighbours`)")
    return read_parts(run.neighbours_dir(model), model)


def read_parts(folder: Location, model: str) -> pa.Table:
    """Every part of a table folder in the neighbour tables' schema, `model` as the first column."""
    parts = [loc.read_parquet().select(NEIGHBOURS_FILE_SCHEMA.names).cast(NEIGHBOURS_FILE_SCHEMA)
             for loc in folder.list(".parquet")]
    table = pa.concat_tables(parts) if parts else NEIGHBOURS_FILE_SCHEMA.empty_table()
    column = pa.array([model] * table.num_rows, pa.string())
    return table.add_column(0, pa.field(PARTITION_KEY, pa.string(), nullable=False), column).cast(
        NEIGHBOURS_SCHEMA)
