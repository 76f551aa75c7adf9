"""The batch query job: search a table of new images (or their embeddings) against a run's indexes.

`flagsim search --run RUN --queries TABLE --out OUT`: OUT becomes a run of its own holding the
queries' embeddings (made by the embed pipeline with each model's recorded weights, or imported)
and `results/model=<m>/part-NNNNN.parquet`, the top-k of every query in RUN, one part per query
shard, written by the neighbours job (`neighbours_job.run_job`) with the query itself kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from flagsim.config import Config
from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.search.catalog import complete_models, search_tables
from flagsim.search.manifest import IndexManifest
from flagsim.search.model_index import check_k
from flagsim.search.neighbours import (
    NeighboursResult,
    PartWriter,
    TablePlan,
    largest_shard,
    publish_staged,
    query_shards,
    read_parts,
    shard_checksum,
    table_indexes,
    vouched_part,
)
from flagsim.search.neighbours_job import JobPlan, index_identity, run_job
from flagsim.search.saved import index_files, source_checksums
from flagsim.shards import read_manifest
from flagsim.storage import Location

log = logging.getLogger(__name__)

RESULTS = "results"


def results_dir(out: RunDir, model: str) -> Location:
    return out.root / RESULTS / f"model={model}"


def _meta_dir(out: RunDir, model: str) -> Location:
    return out.meta / RESULTS / f"model={model}"


def _staged_results(out: RunDir, model: str) -> Location:
    """Where a search writes a results table's new parts until all are written
    (`OUT/_tmp/results/model=<m>/`): the results folder holds one whole table, never a mix of
    an earlier search's parts (another k, index or queries) and new ones."""
    return out.staging / RESULTS / f"model={model}"


#: written into OUT when a search starts: what tells a search's own output (resumed, or searched
#: again) from a folder holding other work, which `flagsim search` never writes into
SEARCH_MARKER = "search.json"


def _where(loc: Location) -> str:
    """`loc` with symbolic links resolved (local), for comparing two folders."""
    return os.path.realpath(loc.path) if loc.is_local else loc.uri.rstrip("/")


def check_out(run: RunDir, out: RunDir) -> None:
    """OUT must be a folder of its own: not RUN (through a link too), not inside it or around
    it, and either new, empty, or an earlier search's output (its `_meta/search.json`)."""
    r, o = _where(run.root), _where(out.root)
    if o == r or o.startswith(r.rstrip("/") + "/") or r.startswith(o.rstrip("/") + "/"):
        raise DataError(f"--out {out.root} must be a directory of its own, not {run.root}, inside "
                        "it or around it (it becomes the queries' run)")
    if out.root.exists() and not (out.meta / SEARCH_MARKER).exists() and (
            out.root.list() or out.root.dirs()):
        raise DataError(f"--out {out.root} already holds other files and is not the output of "
                        "a flagsim search; give a new or empty directory")


def _claim_out(run: RunDir, out: RunDir, queries: str) -> bool:
    """Mark OUT as the output of searching `queries` in `run` (True when this made the mark);
    an OUT marked for another run or other queries is refused (its results would sit beside
    the new ones, read as one table)."""
    marker = out.meta / SEARCH_MARKER
    here = {"run": _where(run.root), "queries": _where(Location.parse(queries))}
    if marker.exists():
        try:
            was = marker.read_json()
        except DataError:
            was = None
        if not isinstance(was, dict):
            raise DataError(f"{marker} is not a search marker; give a new --out directory")
        same = all(was.get(key) in (here[key], given) for key, given in
                   (("run", run.root.uri), ("queries", queries)))
        if not same:
            raise DataError(
                f"--out {out.root} holds the results of searching {was.get('queries')} in "
                f"{was.get('run')}; give a new directory for {queries} in {run.root} (or the same "
                "--run and --queries to resume or add models)")
        if was == here:
            return False
        marker.write_json(here)
        return False
    marker.write_json(here)
    return True


def _unclaim_out(out: RunDir) -> None:
    """Take back a mark `_claim_out` just made when nothing else was written to OUT (the
    queries were refused: a typo must not tie OUT to them)."""
    marker = out.meta / SEARCH_MARKER
    if [loc.name for loc in out.meta.list()] == [SEARCH_MARKER] and not out.meta.dirs() \
            and [d.name for d in out.root.dirs()] == [out.meta.name] and not out.root.list():
        marker.delete()
        for loc in (out.meta, out.root):
            if loc.is_local:
                with contextlib.suppress(OSError):
                    os.rmdir(loc.path)


def queries_kind(queries: str) -> str:
    """`images` (an images table: image_id, name, path), `run` (a flagsim run with embeddings)
    or `embeddings` (a Parquet file or folder with an id and a vector column)."""
    loc = Location.parse(queries)
    if not loc.exists():
        raise DataError(f"queries not found: {queries}")
    if not loc.is_file():
        if (loc / "embeddings").exists() and not (loc / "images.parquet").exists():
            return "run"
        if (loc / "images.parquet").exists():
            return "images"
        files = loc.list(".parquet")
        if not files:
            raise DataError(f"{queries} holds no Parquet file (an images table or embeddings)")
        loc = files[0]
    if {"image_id", "path"} <= set(_schema_names(loc)):
        return "images"
    return "embeddings"


def _schema_names(loc: Location) -> list[str]:
    import pyarrow.parquet as pq

    try:
        with loc.fs.open_input_file(loc.path) as f:
            return pq.ParquetFile(f).schema_arrow.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{loc} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None


def _embed_queries(run: RunDir, out_dir: str, queries: str, names: list[str], cfg: Config,
                   show_progress: bool) -> None:
    """Embed the images table `queries` into `out_dir` with each model's recorded weights."""
    from flagsim.importcsv import is_imported
    from flagsim.pipeline.embed import run_embed

    settings = dict(cfg.embed.model_settings)
    for m in names:
        man = read_manifest(run, m)
        assert man is not None
        if is_imported(man) and not man.checkpoint:
            raise DataError(f"model {m} of {run.root} was imported without --checkpoint: its weights "
                            "are unknown, so new images cannot be embedded like its own; pass "
                            "an embeddings table as --queries")
        base = settings.get(m, cfg.embed.defaults)
        settings[m] = base.model_copy(update={"weights": man.checkpoint, "revision": man.revision})
    embed = cfg.embed.model_copy(update={"models": tuple(names), "model_settings": settings,
                                         "strict": True})
    summary = run_embed(cfg.model_copy(update={"embed": embed}), run_dir=out_dir, images=queries,
                        models=names, show_progress=show_progress)
    failed = [r for r in summary.results if r.status not in ("embedded", "up to date")]
    if failed:
        r = failed[0]
        raise DataError(f"could not embed the queries with {r.model}: {getattr(r, 'reason', r.status)}")


def _query_run(run: RunDir, out: RunDir, queries: str, names: list[str], cfg: Config,
               show_progress: bool) -> RunDir:
    """The run whose embeddings are the queries (OUT, filled first; or the queries' own run)."""
    kind = queries_kind(queries)
    if kind == "run":
        return RunDir.at(queries)
    if kind == "images":
        _embed_queries(run, str(out.root), queries, names, cfg, show_progress)
        return out
    if len(names) != 1:
        raise DataError("an embeddings table holds one model's vectors: name it with --models M "
                        f"(the run has {', '.join(names)})")
    from flagsim.importemb import import_embeddings

    if read_manifest(out, names[0]) is None:
        import_embeddings(queries, names[0], str(out.root), images=False)
    return out


def _plan(run: RunDir, qrun: RunDir, out: RunDir, model: str, members: tuple[str, ...], k: int,
          index: IndexManifest) -> TablePlan:
    check_k(k, model, index.count, exclude_self=False, where=f" of {run.root}")
    qman = read_manifest(qrun, members[0] if members else model)
    if qman is None:
        raise DataError(f"no query embeddings of model {model} in {qrun.root}")
    for m in members or (model,):
        q, r = read_manifest(qrun, m), read_manifest(run, m)
        if q is None or r is None or q.dim != r.dim:
            raise DataError(f"query embeddings of model {m} are {q.dim if q else 'missing'}-d, the "
                            f"run's {r.dim if r else 'missing'}-d")
    checksums = source_checksums(qrun, model, list(members) or None)
    shards = query_shards(checksums, members)
    sources = {s: hashlib.sha256(f"{qrun.root}|{shard_checksum(checksums, s, members)}".encode())
               .hexdigest() for s in shards}
    plan = TablePlan(model, members, index, shards, sources)
    ident = index_identity(index)
    for s in shards:  # a staged part (written, not yet published) is the newer
        marker = vouched_part(_meta_dir(out, model) / "parts" / s.replace(".parquet", ".json"),
                              _staged_results(out, model), results_dir(out, model), s, k, ident,
                              sources[s])
        if marker is not None:
            plan.done[s] = marker
    return plan


def run_search(
    run_dir: str, queries: str, out_dir: str, models: Sequence[str] | None = None,
    k: int | None = None, cfg: Config | None = None, show_progress: bool = True,
) -> list[NeighboursResult]:
    """Search every query of `queries` in `run_dir`'s indexes; results under `out_dir`.

    The query itself is not excluded (a query that is one of the run's images finds itself
    first). Resumable: OUT's embeddings resume like any embed, and result parts with a matching
    marker (same k, index and query shard) are kept, so a rerun does nothing.
    """
    cfg = cfg or Config()
    k = k if k is not None else cfg.neighbours.k
    run, out = RunDir.at(run_dir), RunDir.at(out_dir)
    check_out(run, out)
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    tables = search_tables(run, models)
    names = [m for m, members in tables if not members]
    for m in names:  # before the queries are embedded (the index's own count is checked below)
        man = read_manifest(run, m)
        if man is not None:
            check_k(k, m, man.rows, exclude_self=False, where=f" of {run.root}")
    claimed = _claim_out(run, out, queries)
    try:
        qrun = _query_run(run, out, queries, names, cfg, show_progress)
    except BaseException:
        if claimed:
            _unclaim_out(out)
        raise
    missing = [m for m in names if m not in complete_models(qrun)]
    if missing:
        raise DataError(f"no query embeddings of model {missing[0]} in {qrun.root}")
    indexes = table_indexes(run, tables, cfg)
    plans = [_plan(run, qrun, out, m, members, k, indexes[m]) for m, members in tables]
    resources: dict[str, float] | None = None
    results = []
    for plan in plans:
        start = time.perf_counter()
        writer = PartWriter(out, plan, k, table_dir=_staged_results(out, plan.model),
                            marker_dir=_meta_dir(out, plan.model) / "parts")
        if plan.todo:
            if resources is None:
                from flagsim.pipeline.ray_session import ensure_ray

                resources = ensure_ray(cfg)
            (_meta_dir(out, plan.model) / "manifest.json").delete()
            job = JobPlan(run_uri=str(run.root), model=plan.model, members=plan.members,
                          shards=tuple(plan.todo), k=k, parts=len(index_files(plan.index)),
                          index_cfg=cfg.index, num_actors=cfg.neighbours.num_actors,
                          batch_size=cfg.neighbours.batch_size,
                          index_identity=index_identity(plan.index),
                          query_run_uri=str(qrun.root), exclude_self=False,
                          dim=plan.index.dim,
                          shard_rows=largest_shard(qrun, plan.model, plan.members),
                          buffer_mb=cfg.neighbours.buffer_mb)
            gpu = cfg.index.use_gpu != "no" and resources.get("GPU", 0.0) >= 1
            run_job(job, resources, gpu, cfg.ray.read_cpus, writer.add)
            writer.finish()
        publish_staged(_staged_results(out, plan.model), results_dir(out, plan.model),
                       _meta_dir(out, plan.model) / "parts", plan, k)
        for loc in results_dir(out, plan.model).list(".parquet"):
            if loc.name not in plan.shards:
                loc.delete()
        results.append(_commit(run, out, plan, k, time.perf_counter() - start, len(writer.written)))
    return results


def _commit(run: RunDir, out: RunDir, plan: TablePlan, k: int, seconds: float, written: int
            ) -> NeighboursResult:
    queries = sum(int(plan.done[s].get("queries", 0)) for s in plan.shards)
    rows = sum(int(plan.done[s]["rows"]) for s in plan.shards)
    manifest: dict[str, Any] = {
        "model": plan.model, "k": k, "queries": queries, "rows": rows, "parts": len(plan.shards),
        "run": str(run.root), "index": index_identity(plan.index), "index_kind": plan.index.kind,
        "index_recall": plan.index.recall, "recall_k": plan.index.recall_k,
        "source_models": list(plan.members) or [plan.model], "seconds": round(seconds, 3),
    }
    (_meta_dir(out, plan.model) / "manifest.json").write_json(manifest)
    log.info("%s: top-%d of %d queries in %s -> %s (%d part(s) written)", plan.model, k, queries,
             run.root, results_dir(out, plan.model), written)
    return NeighboursResult(plan.model, queries, rows, len(plan.shards), k, plan.index.kind, seconds,
                            str(results_dir(out, plan.model)), plan.index.recall,
                            plan.index.recall_k, written)


def read_results(out_dir: str, model: str):
    """The results table of `model` in a search's OUT, its model as the first column."""
    out = RunDir.at(out_dir)
    if not (_meta_dir(out, model) / "manifest.json").exists():
        raise DataError(f"no search results for model {model} in {out.root} (run `flagsim search`)")
    return read_parts(results_dir(out, model), model)
