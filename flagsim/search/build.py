"""Build, measure (recall) and commit the index of one model (or the ensemble), shard by shard."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flagsim.config import IndexConfig
from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.schema import INDEX_IDS_SCHEMA
from flagsim.search.backend import FaissIndex, gpu_capable, omp_threads, use_gpu
from flagsim.search.catalog import ENSEMBLE, model_dim
from flagsim.search.choice import held_vectors_bytes, parts_needed, plan_index
from flagsim.search.manifest import (
    IDS_FILE,
    MANIFEST_FILE,
    RECALL_K,
    IndexManifest,
    part_file,
    requested,
)
from flagsim.search.model_index import ModelIndex
from flagsim.search.saved import open_index
from flagsim.search.source import Block, EnsembleSource, VectorSource, source_of
from flagsim.storage import Location

log = logging.getLogger(__name__)

#: the run lock's command while an index is committed (the part before ` --models <m>`)
INDEX_LOCK = "flagsim index"
#: how long a commit waits for another index build's commit (file renames locally; uploads on
#: an object store, so minutes for a large index; a holder that died on another host, whose
#: lock cannot be seen to be stale from here, costs this long)
COMMIT_WAIT_S = 600.0


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def build_index(
    run_dir: str | RunDir, model: str, cfg: IndexConfig | None = None,
    models: Sequence[str] | None = None,
) -> ModelIndex:
    """Build, measure and save the index of `model` under RunDir.index_path(model); return it.

    `model` may be `all`: the ensemble of `models` (default: every complete model). Vectors are
    streamed shard by shard into the index; when the index would not fit
    `index.memory_budget_gb` it is written as several parts (`index-NNNNN.faiss`, contiguous
    position ranges searched separately and merged exactly). Each part is written with FAISS
    straight to a staged file, so no serialised copy is held in memory.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.at(run_dir)
    cfg = cfg or IndexConfig()
    src = source_of(run, model, models)
    if model != ENSEMBLE:
        expected_dim = model_dim(model)
        if expected_dim is not None and src.dim != expected_dim:
            log.warning("%s: %d-d embeddings, the registry's model is %d-d", model, src.dim, expected_dim)
    n, dim = src.rows, src.dim
    if isinstance(src, EnsembleSource):
        if n < 1:
            raise DataError(f"no image of {run.root} is in every one of the models "
                            f"{', '.join(src.models)} (in shard files of the same name)")
        if short := src.shortfall(n):
            log.warning("%s", short)
    if n < 1:
        raise DataError(f"model {model} has no embeddings to index in {run.root}")
    kind, factory, params = plan_index(n, dim, cfg)
    nparts = parts_needed(kind, n, dim, params, cfg)
    gpu = use_gpu(cfg) and gpu_capable(kind)
    start, threads = time.perf_counter(), omp_threads()
    log.info("%s: building %s index (%s) of %d x %d on %s%s (%d CPU thread(s))", model, kind,
             factory, n, dim, "GPU" if gpu else "CPU", f" in {nparts} parts" if nparts > 1 else "",
             threads)
    rng = np.random.default_rng(0)
    exact = kind == "flat"
    sample_pos = None if exact else np.sort(rng.choice(n, size=min(cfg.recall_sample, n), replace=False))
    train_pos = None
    if kind in ("ivf", "ivfpq"):
        ntrain = min(n, max(64 * params["nlist"], 256 * 39 if kind == "ivfpq" else 0))
        train_pos = np.sort(rng.choice(n, size=ntrain, replace=False))
    train, samples = (None, None)
    blocks: Iterable[Block] = src  # what fills the index: the shards, read again, or held rows
    if train_pos is not None or sample_pos is not None:
        hold = held_vectors_bytes(kind, n, dim, params, cfg) > 0
        train, samples, held = _gather(src, dim, train_pos, sample_pos, hold=hold)
        if held is not None:
            blocks = held

    remove_dead_staging(run)
    stage = _Staging(run)
    staging = stage.path
    try:
        try:
            built = _fill(src, blocks, kind, factory, params, nparts, gpu, train, samples,
                          sample_pos, staging)
        except (RuntimeError, AttributeError) as exc:  # e.g. a PQ size the GPU kernels lack
            if not gpu:
                raise
            log.warning("%s: cannot build on GPU (%s); building on CPU", model, _first_line(exc))
            gpu = False
            built = _fill(src, blocks, kind, factory, params, nparts, False, train, samples,
                          sample_pos, staging)
        del blocks, train
        files, parts, recall, last = built
        seconds = time.perf_counter() - start
        k_recall = min(RECALL_K, n - 1)
        manifest = IndexManifest(
            model=model, dim=dim, count=n, kind=kind, factory=factory, shards=src.checksums(),
            params=params, requested=requested(cfg), exact=exact,
            recall=None if recall is None else round(recall, 6),
            recall_k=None if exact else k_recall,
            recall_sample=0 if sample_pos is None else len(sample_pos),
            device="gpu" if gpu else "cpu", build_seconds=round(seconds, 3),
            build_threads=threads,
            index_bytes=sum(p["size"] for p in parts), parts=parts,
            source_models=list(getattr(src, "models", [model])),
        )
        if recall is not None:
            log.info("%s: %s recall@%d = %.4f on %d sampled queries", model, kind, k_recall, recall,
                     len(sample_pos) if sample_pos is not None else 0)
        root = run.index_path(model)
        _commit(run, root, manifest, files)
    finally:
        stage.close()
    log.info("%s: wrote %s (%s, %d vectors, %.2fs)", model, root, kind, n, seconds)
    if last is not None:  # one part: the index just built, without reading it back
        ids_table = (root / IDS_FILE).read_parquet()
        return ModelIndex(model, last, ids_table.column("image_id"), ids_table.column("name"),
                          manifest, root)
    return open_index(run, model, manifest, cfg)


def _fill(
    src: VectorSource, blocks: Iterable[Block], kind: str, factory: str, params: dict[str, Any],
    nparts: int, gpu: bool, train: np.ndarray | None, samples: np.ndarray | None,
    sample_pos: np.ndarray | None, staging: str,
) -> tuple[dict[str, str], list[dict[str, Any]], float | None, FaissIndex | None]:
    """Create, train and fill the parts with `blocks` (`src`'s rows in order); ({file name:
    staged path}, parts, recall, last part).

    Vectors go into part `p` while their global position is below its end; each full part is
    saved and released before the next is filled. The exact top-k of the recall sample is kept
    in one heap over all vectors, the approximate one merged over the parts (as IndexShards).
    """
    import faiss

    n, dim = src.rows, src.dim
    per_part = math.ceil(n / nparts)
    template = FaissIndex.create(dim, kind, factory, params, on_gpu=gpu)
    if train is not None:
        template.train(train)
    trained_cpu = template.cpu_index if nparts > 1 else None
    kk = min(RECALL_K + 1, n)
    exact_heap = approx_heap = None
    if samples is not None:
        exact_heap = faiss.ResultHeap(samples.shape[0], kk, keep_max=True)
        approx_heap = faiss.ResultHeap(samples.shape[0], kk, keep_max=True)
    files: dict[str, str] = {}
    parts: list[dict[str, Any]] = []
    ids_path = os.path.join(staging, IDS_FILE)
    writer = pq.ParquetWriter(ids_path, INDEX_IDS_SCHEMA, compression="zstd")
    current: FaissIndex | None = None
    offset = 0  # global position of the next vector
    part_start = 0

    def close_part(index: FaissIndex, start: int) -> None:
        name = part_file(len(parts), nparts)
        path = os.path.join(staging, name)
        if approx_heap is not None and samples is not None:
            index.set_search_params()
            d, i = index.search(samples, min(kk, index.count))
            approx_heap.add_result(d, np.where(i >= 0, i + start, -1))
        size = index.save(path)
        files[name] = path
        parts.append({"file": name, "offset": start, "count": index.count, "size": size})

    try:
        for block in blocks:
            vec, lo = block.vectors, 0
            writer.write_table(pa.Table.from_arrays(
                [pa.array(block.ids, pa.string()), pa.array(block.names, pa.string())],
                schema=INDEX_IDS_SCHEMA))
            if exact_heap is not None and samples is not None and len(vec):
                d, i = faiss.knn(samples, vec, min(kk, len(vec)), metric=faiss.METRIC_INNER_PRODUCT)
                exact_heap.add_result(d, np.where(i >= 0, i + offset, -1))
            while lo < len(vec):
                if current is None:
                    current = template if nparts == 1 else FaissIndex(
                        faiss.clone_index(trained_cpu), kind, params)
                    part_start = offset + lo
                take = min(len(vec) - lo, part_start + per_part - (offset + lo))
                if take <= 0:  # the last part is full: the shards hold more rows than counted
                    raise DataError(f"model {src.name}: the shards hold more rows than the {n} "
                                    "its manifest counts")
                current.add(vec[lo:lo + take])
                lo += take
                if current.count == per_part and len(parts) < nparts - 1:
                    close_part(current, part_start)
                    current = None
            offset += len(vec)
    finally:
        writer.close()
    if offset != n:
        raise DataError(f"model {src.name}: the manifest says {n} rows but the shards hold {offset}")
    if current is None:  # n was an exact multiple of the part size
        current = FaissIndex.create(dim, kind, factory, params)
        if trained_cpu is not None:
            current = FaissIndex(faiss.clone_index(trained_cpu), kind, params)
        part_start = offset
    close_part(current, part_start)
    files[IDS_FILE] = ids_path
    ids = pq.read_table(ids_path, columns=["image_id"]).column("image_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise DataError(f"embeddings of model {src.name} hold duplicate image ids")
    recall = 1.0 if kind == "flat" else None
    if exact_heap is not None and approx_heap is not None and sample_pos is not None:
        exact_heap.finalize()
        approx_heap.finalize()
        recall = _recall(approx_heap.I, exact_heap.I, sample_pos, min(RECALL_K, n - 1))
    return files, parts, recall, current if nparts == 1 else None


#: in each build's staging folder: the build holds an exclusive flock on it while it runs
OWNER_FILE = ".owner"


def _staging_place(run: RunDir) -> tuple[str, str]:
    """(directory, name prefix) of the builds' staging folders: the run's `_tmp/` when the run
    is local, else the system's temporary directory."""
    if run.root.is_local:
        return run.staging.path, "index-"
    return tempfile.gettempdir(), "flagsim-index-"


class _Staging:
    """A fresh local folder for the files being built, `<prefix><host>-<pid>-<random>`, locked
    for the build's lifetime: an exclusive flock on its owner file, which the kernel releases
    when the process dies however it dies, so `remove_dead_staging` on the same host can tell a
    dead build's folder from a live one's, in any pid namespace (containers sharing the host's
    name) and without trusting a pid that may have been reused."""

    def __init__(self, run: RunDir) -> None:
        where, prefix = _staging_place(run)
        os.makedirs(where, exist_ok=True)
        # made and locked under a hidden name no cleaner looks at, then renamed into view
        hidden = tempfile.mkdtemp(prefix=f".{prefix}{socket.gethostname()}-{os.getpid()}-",
                                  dir=where)
        self.fd = os.open(os.path.join(hidden, OWNER_FILE), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a filesystem without locks: never removed by another build
            log.debug("no flock on %s: its staging folder is removed only by this build", where)
        self.path = os.path.join(where, os.path.basename(hidden)[1:])
        os.rename(hidden, self.path)

    def close(self) -> None:
        try:
            _remove_dir(self.path)
        finally:
            os.close(self.fd)


def remove_dead_staging(run: RunDir) -> int:
    """Delete the staging folders that builds on this host left when their process died
    (killed, out of memory: the `finally` that removes them never ran): those whose owner file
    is not locked. A live build's folder, a folder without an owner file and another host's
    (on a shared filesystem whose locks may be local to each node) are left alone. How many
    were removed."""
    where, prefix = _staging_place(run)
    mine = f"{prefix}{socket.gethostname()}-"
    try:
        # `<pid>-<mkdtemp's suffix>` after this host's name (a host `<name>-...` differs)
        names = [n for n in os.listdir(where)
                 if n.startswith(mine) and re.fullmatch(r"\d+-[a-z0-9_]+", n[len(mine):])]
    except OSError:
        return 0
    removed = 0
    for name in names:
        path = os.path.join(where, name)
        try:
            fd = os.open(os.path.join(path, OWNER_FILE), os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its build runs (or locks are not supported here)
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d staging folder(s) of index builds that died, in %s", removed, where)
    return removed


def _remove_dir(path: str) -> None:
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


def _commit(run: RunDir, root: Location, manifest: IndexManifest, files: dict[str, str]) -> None:
    """Replace the index files under `root` the way shards are committed.

    The old manifest goes first, so a crash while the files are replaced leaves no manifest
    (the index reads as missing, never as an old manifest over new files); each staged file is
    renamed (or uploaded) into place; files of the old index not in the new one are deleted;
    the new manifest, recording each file's size and sha256, goes last. The run is locked for
    the writes only (see flagsim.runlock).
    """
    from flagsim.runlock import run_lock

    manifest.files = {name: {"size": os.path.getsize(path), "sha256": _sha256_file(path)}
                      for name, path in files.items()}
    # the index builds of one command run at once (search/build_tasks.py) and commit one by
    # one: a build finding another's commit under way waits for it; any other writer is refused
    with run_lock(run.root, f"{INDEX_LOCK} --models {manifest.model}", wait_for=INDEX_LOCK,
                  wait_s=COMMIT_WAIT_S):
        (root / MANIFEST_FILE).delete()
        for name, path in files.items():
            (root / name).put_file(path)
        for old in root.list(".faiss"):
            if old.name not in files:
                old.delete()
        (root / MANIFEST_FILE).write_json(manifest.to_json())  # last: marks the index complete


def _gather(
    src: VectorSource, dim: int, train_pos: np.ndarray | None, sample_pos: np.ndarray | None,
    hold: bool = False,
) -> tuple[np.ndarray | None, np.ndarray | None, list[Block] | None]:
    """(training rows, recall sample rows, every block when `hold`, else None): the rows at
    the given global positions, in one pass over the shards."""
    want = {"train": train_pos, "sample": sample_pos}
    got: dict[str, list[np.ndarray]] = {k: [] for k in want}
    held: list[Block] | None = [] if hold else None
    offset = 0
    for block in src:
        if held is not None:
            held.append(block)
        vec = block.vectors
        lo, hi = offset, offset + len(vec)
        for key, positions in want.items():
            if positions is None:
                continue
            sel = positions[(positions >= lo) & (positions < hi)] - lo
            if len(sel):
                got[key].append(vec[sel])
        offset = hi

    def cat(key: str) -> np.ndarray | None:
        if want[key] is None:
            return None
        return np.ascontiguousarray(np.concatenate(got[key]) if got[key] else np.zeros((0, dim), np.float32))

    return cat("train"), cat("sample"), held


def _recall(approx_pos: np.ndarray, exact_pos: np.ndarray, sample_pos: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the sampled queries (each query itself excluded)."""
    if k < 1 or len(sample_pos) == 0:
        return 1.0
    total = 0.0
    for q, self_pos in enumerate(sample_pos):
        truth = [p for p in exact_pos[q] if p >= 0 and p != self_pos][:k]
        found = [p for p in approx_pos[q] if p >= 0 and p != self_pos][:k]
        total += len(set(truth) & set(found)) / k
    return total / len(sample_pos)
