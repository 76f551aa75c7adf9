"""FAISS cosine indexes per model: choose, build, save, load-or-build, and search with self excluded."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flagsim import __version__
from flagsim.config import IndexConfig
from flagsim.errors import ConfigError, DataError
from flagsim.rundir import RunDir
from flagsim.shards import EmbeddingSet, iter_shards, read_manifest, vectors_of
from flagsim.storage import Location

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: noise

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "_manifest.json"
METRIC = "cosine"  # inner product of L2-normalised vectors
ENSEMBLE = "all"  # the name of the ensemble ranking (mean cosine over models)
RECALL_K = 10  # recall@10 is measured for approximate indexes
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128
GPU_MAX_K = 2048  # FAISS GPU indexes return at most this many results per query
_IDS_SCHEMA = pa.schema([pa.field("image_id", pa.string(), False), pa.field("name", pa.string(), False)])


@dataclass(frozen=True)
class Hit:
    """One neighbour of a query: 1-based rank, image id, display name and cosine similarity."""

    rank: int
    image_id: str
    name: str
    score: float


# --- vectors ---------------------------------------------------------------------------------


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous); all-zero rows stay zero."""
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    zero = norms == 0
    if zero.any():
        log.warning("%d zero vector(s): their cosine similarity is 0 to everything", int(zero.sum()))
    norms[zero] = 1.0
    x /= norms[:, None].astype(np.float32)
    return x


def model_dim(model: str) -> int | None:
    """The registry's embedding dimension of `model`, or None when it is not registered."""
    try:
        from flagsim.models import get_spec
    except ImportError:  # registry not importable: nothing to check against
        return None
    try:
        return int(get_spec(model).dim)
    except KeyError:  # UnknownModelError is a KeyError
        return None


def complete_models(run: RunDir) -> list[str]:
    """Models of the run whose embeddings are complete (have a manifest), in a stable order.

    Registered models come in registry order, then the others alphabetically.
    """
    found = [m for m in run.embedded_models() if run.manifest(m).exists()]
    incomplete = sorted(set(run.embedded_models()) - set(found))
    for m in incomplete:
        log.warning("skipping %s: its embeddings are incomplete (no _manifest.json)", m)
    try:
        from flagsim.models import list_models

        order = {name: i for i, name in enumerate(list_models())}
    except ImportError:
        order = {}
    return sorted(found, key=lambda m: (order.get(m, len(order)), m))


def resolve_models(run: RunDir, models: Sequence[str] | None) -> list[str]:
    """`models` checked against the run (None or ["all"]: every complete model)."""
    available = complete_models(run)
    if not models or list(models) == [ENSEMBLE]:
        if not available:
            raise DataError(
                f"no embeddings in {run.root} (run `flagsim embed` or `flagsim import-csv` first)"
            )
        return available
    out: list[str] = []
    for m in models:
        if m == ENSEMBLE:
            continue
        if m not in out:
            out.append(m)
    for m in out:
        if not run.model_dir(m).exists():
            have = ", ".join(available) or "none"
            raise DataError(f"no embeddings for model {m} in {run.root} (models present: {have})")
    return out


# --- manifest --------------------------------------------------------------------------------


@dataclass
class IndexManifest:
    """What one saved index holds and how it was built; written last (its presence = complete)."""

    model: str
    dim: int
    count: int
    kind: str  # flat | ivf | hnsw | ivfpq
    factory: str  # the faiss.index_factory string
    metric: str = METRIC
    shards: dict[str, str] = field(default_factory=dict)  # source shard file -> sha256
    params: dict[str, Any] = field(default_factory=dict)  # nlist, nprobe, hnsw_m, ef_search, pq_m
    requested: dict[str, Any] = field(default_factory=dict)  # the IndexConfig it was built from
    exact: bool = True
    recall: float | None = None  # measured recall@recall_k against exact search (1.0 for flat)
    recall_k: int | None = None
    recall_sample: int = 0  # queries in the recall measurement (0: exact, nothing to measure)
    device: str = "cpu"
    build_seconds: float | None = None
    index_bytes: int | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # index file -> size, sha256
    flagsim_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexManifest:
        if not isinstance(data, dict):
            raise DataError(f"{where} is not a valid index manifest")
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise DataError(f"{where} is not a valid index manifest: {exc}") from exc


def _requested(cfg: IndexConfig) -> dict[str, Any]:
    """The settings that decide what gets built (use_gpu only decides where)."""
    return cfg.model_dump(exclude={"use_gpu"})


# --- index choice ----------------------------------------------------------------------------


def default_nlist(n: int) -> int:
    """About 4*sqrt(n) inverted lists, but at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def default_pq_m(dim: int, n: int, budget_bytes: float) -> int:
    """Most PQ sub-quantisers (dividing `dim`, at most 64 and dim/2) whose codes fit the budget."""
    divisors = [m for m in range(1, min(64, max(1, dim // 2)) + 1) if dim % m == 0]
    fitting = [m for m in divisors if n * (m + 8) <= budget_bytes]
    return max(fitting) if fitting else min(divisors)


def flat_bytes(n: int, dim: int) -> int:
    return n * dim * 4


def hnsw_bytes(n: int, dim: int, m: int) -> int:
    return n * (dim * 4 + m * 2 * 4 + 8)


def choose_kind(n: int, dim: int, cfg: IndexConfig) -> str:
    """The index kind for `n` vectors of `dim` floats under `cfg` (see docs/query.md).

    `auto`: exact `flat` when n <= exact_max_rows and the vectors fit the memory budget; else
    `ivf` (IVF-Flat: exact distances, probes `nprobe` lists) when the vectors plus ids fit;
    else `ivfpq` (compressed codes). HNSW is used only when asked for (`kind: hnsw`).
    """
    budget = cfg.memory_budget_gb * 1024**3
    if cfg.kind != "auto":
        return cfg.kind
    if n <= cfg.exact_max_rows and flat_bytes(n, dim) <= budget:
        return "flat"
    if flat_bytes(n, dim) + 8 * n <= budget:
        return "ivf"
    return "ivfpq"


def _plan(n: int, dim: int, cfg: IndexConfig) -> tuple[str, str, dict[str, Any]]:
    """(kind, factory string, params) for the collection."""
    kind = choose_kind(n, dim, cfg)
    budget = cfg.memory_budget_gb * 1024**3
    params: dict[str, Any] = {}
    if kind == "flat":
        if flat_bytes(n, dim) > budget:
            log.warning(
                "exact index of %d x %d floats needs %.1f GB, over index.memory_budget_gb=%s",
                n, dim, flat_bytes(n, dim) / 1024**3, cfg.memory_budget_gb,
            )
        return kind, "Flat", params
    if kind == "hnsw":
        params = {"hnsw_m": cfg.hnsw_m, "ef_construction": HNSW_EF_CONSTRUCTION,
                  "ef_search": HNSW_EF_SEARCH}
        return kind, f"HNSW{cfg.hnsw_m}", params
    nlist = cfg.nlist or default_nlist(n)
    if nlist > n:
        raise ConfigError(f"index.nlist={nlist} is more than the {n} vectors to index")
    params = {"nlist": nlist, "nprobe": min(cfg.nprobe, nlist)}
    if kind == "ivf":
        return kind, f"IVF{nlist},Flat", params
    pq_m = cfg.pq_m or default_pq_m(dim, n, budget)
    if dim % pq_m:
        raise ConfigError(f"index.pq_m={pq_m} must divide the embedding dimension {dim}")
    if n < 256:
        raise ConfigError(f"an ivfpq index needs at least 256 vectors to train, got {n}")
    if n * (pq_m + 8) > budget:
        raise ConfigError(
            f"{n} vectors do not fit index.memory_budget_gb={cfg.memory_budget_gb} even as "
            f"{pq_m}-byte PQ codes; raise the budget"
        )
    params.update(pq_m=pq_m, pq_bits=8)
    return kind, f"IVF{nlist},PQ{pq_m}", params


# --- GPU -------------------------------------------------------------------------------------

_GPU_RESOURCES: Any = None


def gpu_count() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get else 0
    except Exception:  # noqa: BLE001 - a broken CUDA setup means no GPU for FAISS
        return 0


def use_gpu(cfg: IndexConfig) -> bool:
    """Whether to build and search on GPU: FAISS sees one and `use_gpu` is not `no`."""
    if cfg.use_gpu == "no":
        return False
    n = gpu_count()
    if cfg.use_gpu == "yes" and n == 0:
        raise ConfigError("index.use_gpu=yes but FAISS sees no GPU (is faiss-gpu installed?)")
    return n > 0


def _to_gpu(index: Any, kind: str) -> Any:
    """A copy of `index` on GPU 0 (float16 intermediates for IVF-PQ, which needs them for
    large codes; IVF-Flat and Flat keep float32 vectors)."""
    import faiss

    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = kind == "ivfpq"
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index, opts)


def _gpu_capable(kind: str) -> bool:
    return kind in ("flat", "ivf", "ivfpq")


def _set_search_params(index: Any, kind: str, params: Mapping[str, Any], on_gpu: bool) -> None:
    import faiss

    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    if kind in ("ivf", "ivfpq"):
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw":
        space.set_index_parameter(index, "efSearch", int(params["ef_search"]))


# --- the loaded index ------------------------------------------------------------------------


@dataclass
class ModelIndex:
    """A searchable cosine index of one model (or of the ensemble, kept in memory)."""

    model: str
    index: Any  # faiss.Index (a GPU copy when searching on GPU)
    ids: np.ndarray  # object array of image ids, in index order
    names: np.ndarray  # object array of display names
    manifest: IndexManifest | None = None
    location: Location | None = None
    cpu_index: Any = None  # the CPU index when `index` is a GPU copy
    _pos: dict[str, int] | None = field(default=None, repr=False)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def position(self, image_id: str) -> int | None:
        if self._pos is None:
            self._pos = {str(i): p for p, i in enumerate(self.ids)}
        return self._pos.get(image_id)

    def __contains__(self, image_id: str) -> bool:
        return self.position(image_id) is not None

    def check_k(self, k: int, exclude_self: bool = True) -> None:
        """One-line DataError when `k` neighbours cannot exist in this collection."""
        most = self.count - 1 if exclude_self else self.count
        if k < 1:
            raise DataError(f"k must be at least 1, got {k}")
        if k > most:
            raise DataError(
                f"k={k} is larger than the collection: model {self.model} has {self.count} images, "
                f"so at most {most} neighbours each"
            )

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[str | None] | None = None,
        normalised: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores [q, k], positions [q, k]) of each query row; -1 / NaN pad missing hits.

        `exclude[i]` (an image id or None) is left out of row i's results (the query itself).
        """
        q = np.ascontiguousarray(vectors, dtype=np.float32) if normalised else normalise(vectors)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(
                f"query vectors of shape {tuple(q.shape)} do not match the {self.dim}-d index "
                f"of model {self.model}"
            )
        nq = q.shape[0]
        excl = None
        if exclude is not None:
            if len(exclude) != nq:
                raise ValueError("exclude must have one entry per query row")
            excl = np.array([-2 if e is None else (self.position(e) if e in self else -2)
                             for e in exclude], dtype=np.int64)
        kk = min(k + (1 if excl is not None else 0), self.count)
        index = self.index
        if self.cpu_index is not None and kk > GPU_MAX_K:
            index = self.cpu_index
        scores, pos = index.search(q, kk)
        if excl is not None:
            hit = pos == excl[:, None]
            drop = hit.copy()
            if kk > k:  # asked for one extra: drop the last where the query was not returned
                drop[~hit.any(axis=1), -1] = True
            order = np.argsort(drop, axis=1, kind="stable")  # kept first, in rank order
            scores = np.take_along_axis(np.where(drop, np.nan, scores), order, 1)
            pos = np.take_along_axis(np.where(drop, -1, pos), order, 1)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
            pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
        scores = scores[:, :k].astype(np.float32)
        pos = pos[:, :k]
        scores[pos < 0] = np.nan
        return scores, pos

    def hits(
        self, vectors: np.ndarray, k: int, exclude: Sequence[str | None] | None = None
    ) -> list[list[Hit]]:
        """`search` as lists of Hit (missing results left out)."""
        scores, pos = self.search(vectors, k, exclude)
        out = []
        for srow, prow in zip(scores, pos, strict=True):
            out.append([
                Hit(r + 1, str(self.ids[p]), str(self.names[p]), float(s))
                for r, (s, p) in enumerate(zip(srow, prow, strict=True)) if p >= 0
            ])
        return out


# --- reading the source ----------------------------------------------------------------------


def shard_file_hashes(run: RunDir, model: str) -> dict[str, str]:
    """sha256 of every shard file of `model` listed in its manifest (DataError when one is missing)."""
    manifest = read_manifest(run, model)
    if manifest is None:
        # iter_shards raises the clear "no embeddings" / "incomplete" error
        next(iter_shards(run, model), None)
        raise DataError(f"no embeddings for model {model} in {run.root}")
    out = {}
    for name in sorted(manifest.shards):
        loc = run.model_dir(model) / name
        if not loc.exists():
            raise DataError(
                f"{loc} is listed in the manifest but missing; "
                f"repair with `flagsim embed --repair --models {model}`"
            )
        data = loc.read_bytes()
        _check_rows(loc, data, manifest.shards[name], model)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _check_rows(loc, data: bytes, expected: int, model: str) -> None:
    """DataError naming `loc` when it is not Parquet or its row count disagrees with the manifest."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    hint = f"; repair with `flagsim embed --repair --models {model}`"
    try:
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{loc} is not a readable Parquet file ({exc}){hint}") from None
    if rows != expected:
        raise DataError(f"{loc} has {rows} rows but the manifest says {expected}{hint}")


def _iter_vectors(run: RunDir, model: str, dim: int):
    """(shard location, ids, names, normalised vectors) of each validated shard."""
    for loc, table in iter_shards(run, model):
        vec = vectors_of(table)
        if vec.shape[1] != dim:
            raise DataError(f"{loc}: embedding dim {vec.shape[1]} disagrees with the manifest's {dim}")
        if not np.isfinite(vec).all():
            raise DataError(f"{loc} holds NaN/Inf embeddings")
        yield loc, table.column("image_id").to_pylist(), table.column("name").to_pylist(), normalise(vec)


# --- build -----------------------------------------------------------------------------------


def build_index(run_dir: str | RunDir, model: str, cfg: IndexConfig | None = None) -> ModelIndex:
    """Build, measure and save the index of `model` under RunDir.index_path(model); return it."""
    import faiss

    run = run_dir if isinstance(run_dir, RunDir) else RunDir.at(run_dir)
    cfg = cfg or IndexConfig()
    emb = read_manifest(run, model)
    if emb is None:
        next(iter_shards(run, model), None)  # raises the clear error
        raise DataError(f"no embeddings for model {model} in {run.root}")
    if emb.model != model:
        raise DataError(f"{run.manifest(model)} describes model {emb.model}, not {model}")
    expected_dim = model_dim(model)
    if expected_dim is not None and emb.dim != expected_dim:
        log.warning("%s: %d-d embeddings, the registry's model is %d-d", model, emb.dim, expected_dim)
    n, dim = int(emb.rows), int(emb.dim)
    if n < 1:
        raise DataError(f"{run.manifest(model)}: model {model} has no embeddings to index")
    kind, factory, params = _plan(n, dim, cfg)
    gpu = use_gpu(cfg) and _gpu_capable(kind)
    start = time.perf_counter()
    log.info("%s: building %s index (%s) of %d x %d on %s", model, kind, factory, n, dim,
             "GPU" if gpu else "CPU")

    rng = np.random.default_rng(0)
    exact = kind == "flat"
    sample_pos = np.sort(rng.choice(n, size=min(cfg.recall_sample, n), replace=False)) if not exact else None
    train_pos = None
    if kind in ("ivf", "ivfpq"):
        ntrain = min(n, max(64 * params["nlist"], 256 * 39 if kind == "ivfpq" else 0))
        train_pos = np.sort(rng.choice(n, size=ntrain, replace=False))
    train: np.ndarray | None = None
    samples: np.ndarray | None = None
    if train_pos is not None or sample_pos is not None:
        train, samples = _gather(run, model, dim, train_pos, sample_pos)

    def fill(on_gpu: bool):
        """Create, train and fill the index; (index, ids, names, shard hashes, exact top-k heap)."""
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = params["ef_construction"]
        elif kind == "ivfpq":
            # polysemous training (on by default) only serves Hamming-filtered search and
            # costs minutes even on small data
            faiss.downcast_index(index).do_polysemous_training = False
        if on_gpu:
            index = _to_gpu(index, kind)
        if train is not None:
            index.train(train)
        ids: list[str] = []
        names: list[str] = []
        hashes: dict[str, str] = {}
        heap = None
        kk = min(RECALL_K + 1, n)
        if samples is not None:
            heap = faiss.ResultHeap(samples.shape[0], kk, keep_max=True)
        for loc, sid, snames, vec in _iter_vectors(run, model, dim):
            hashes[loc.name] = hashlib.sha256(loc.read_bytes()).hexdigest()
            if heap is not None and len(vec):
                d, i = faiss.knn(samples, vec, min(kk, len(vec)), metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(d, np.where(i >= 0, i + len(ids), -1))
            index.add(vec)
            ids.extend(sid)
            names.extend(snames)
        return index, ids, names, hashes, heap

    if gpu:
        try:
            index, ids, names, hashes, heap = fill(True)
        except (RuntimeError, AttributeError) as exc:  # e.g. a PQ size the GPU kernels lack
            log.warning("%s: cannot build on GPU (%s); building on CPU", model,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            gpu = False
    if not gpu:
        index, ids, names, hashes, heap = fill(False)
    train = None  # free the training sample
    if len(ids) != n:
        raise DataError(f"{run.manifest(model)} says {n} rows but the shards hold {len(ids)}")
    if len(set(ids)) != len(ids):
        raise DataError(f"embeddings of model {model} hold duplicate image ids")

    recall = 1.0 if exact else None
    if not exact:
        _set_search_params(index, kind, params, gpu)
    if heap is not None and samples is not None and sample_pos is not None:
        heap.finalize()
        recall = _recall(index, samples, sample_pos, heap.I, min(RECALL_K, n - 1))
        log.info("%s: %s recall@%d = %.4f on %d sampled queries", model, kind,
                 min(RECALL_K, n - 1), recall, len(sample_pos))

    saved = faiss.index_gpu_to_cpu(index) if gpu else index
    blob = faiss.serialize_index(saved).tobytes()
    seconds = time.perf_counter() - start
    manifest = IndexManifest(
        model=model, dim=dim, count=n, kind=kind, factory=factory, shards=hashes, params=params,
        requested=_requested(cfg), exact=exact, recall=None if recall is None else round(recall, 6),
        recall_k=None if exact else min(RECALL_K, n - 1),
        recall_sample=0 if sample_pos is None else len(sample_pos),
        device="gpu" if gpu else "cpu", build_seconds=round(seconds, 3), index_bytes=len(blob),
    )
    root = run.index_path(model)
    _commit(run, root, manifest, {INDEX_FILE: blob, IDS_FILE: _ids_parquet(ids, names)})
    log.info("%s: wrote %s (%s, %d vectors, %.2fs)", model, root, kind, n, seconds)
    return ModelIndex(
        model, index, np.array(ids, dtype=object), np.array(names, dtype=object), manifest, root,
        cpu_index=saved if gpu else None,
    )


def _ids_parquet(ids: list[str], names: list[str]) -> bytes:
    buf = io.BytesIO()
    table = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(names, pa.string())],
                                 schema=_IDS_SCHEMA)
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _commit(run: RunDir, root: Location, manifest: IndexManifest, files: Mapping[str, bytes]) -> None:
    """Replace the index files under `root` the way shards are committed.

    The old manifest goes first, so a crash while the files are replaced leaves no manifest
    (the index reads as missing, never as an old manifest over new files); each file is written
    atomically; the new manifest, recording each file's size and sha256 (of the bytes written),
    goes last. The run is locked for the writes only (see flagsim.runlock).
    """
    from flagsim.runlock import run_lock

    manifest.files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for name, data in files.items()}
    with run_lock(run.root, f"flagsim index --models {manifest.model}"):
        (root / MANIFEST_FILE).delete()
        for name, data in files.items():
            (root / name).write_bytes(data)
        (root / MANIFEST_FILE).write_json(manifest.to_json())  # last: marks the index complete


def _gather(
    run: RunDir, model: str, dim: int, train_pos: np.ndarray | None, sample_pos: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows at the given global positions (one pass over the shards)."""
    want = {"train": train_pos, "sample": sample_pos}
    got: dict[str, list[np.ndarray]] = {k: [] for k in want}
    offset = 0
    for _, _, _, vec in _iter_vectors(run, model, dim):
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

    return cat("train"), cat("sample")


def _recall(index: Any, samples: np.ndarray, sample_pos: np.ndarray, exact_pos: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the sampled queries (each query itself excluded)."""
    if k < 1 or len(sample_pos) == 0:
        return 1.0
    _, approx = index.search(samples, k + 1)
    total = 0.0
    for q, self_pos in enumerate(sample_pos):
        truth = [p for p in exact_pos[q] if p >= 0 and p != self_pos][:k]
        found = [p for p in approx[q] if p >= 0 and p != self_pos][:k]
        total += len(set(truth) & set(found)) / k
    return total / len(sample_pos)


# --- load / freshness ------------------------------------------------------------------------


def read_index_manifest(run: RunDir, model: str) -> IndexManifest | None:
    loc = run.index_path(model) / MANIFEST_FILE
    if not loc.exists():
        return None
    manifest = IndexManifest.from_json(loc.read_json(), str(loc))
    if manifest.model != model:
        raise DataError(f"{loc} describes the index of model {manifest.model}, not {model}")
    return manifest


def _sha256_of(loc: Location, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (memory stays one chunk whatever the size)."""
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_problem(root: Location, manifest: IndexManifest, name: str, data: bytes | None = None,
                  verify: bool = False) -> str | None:
    """Why index file `name` is not the one `manifest` recorded, or None when it is.

    The size is always compared; the sha256 too when `data` (the file's bytes) is given, or
    `verify` (then the file is hashed streaming).
    """
    loc = root / name
    where = root / MANIFEST_FILE
    if data is None and not loc.exists():
        return f"{loc} is missing"
    record = manifest.files.get(name)
    if not isinstance(record, dict) or "size" not in record or "sha256" not in record:
        return f"{where} records no size and sha256 of {name} (written by an older flagsim)"
    size = len(data) if data is not None else loc.size()
    if size != record["size"]:
        return (f"{loc} is {size} bytes but {where} records {record['size']} "
                "(an interrupted or concurrent build?)")
    if data is not None or verify:
        digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256_of(loc)
        if digest != record["sha256"]:
            return f"{loc} does not match the sha256 in {where} (corrupt or replaced)"
    return None


def index_state(
    run: RunDir, model: str, cfg: IndexConfig | None = None, *, verify: bool = False
) -> tuple[str, str]:
    """("fresh" | "missing" | "stale", reason) of the saved index of `model`.

    Stale: an index file differs in size from its manifest (in sha256 too with `verify`), a
    source shard was added, removed or changed (sha256), the embedding dim changed, or `cfg`
    (when given) asks for different index settings.
    """
    root = run.index_path(model)
    manifest = read_index_manifest(run, model)
    if manifest is None:
        return "missing", f"no index at {root}"
    for name in (INDEX_FILE, IDS_FILE):
        problem = _file_problem(root, manifest, name, verify=verify)
        if problem:
            return "stale", problem
    emb = read_manifest(run, model)
    hashes = shard_file_hashes(run, model)
    where = root / MANIFEST_FILE
    if emb is not None and emb.dim != manifest.dim:
        return "stale", f"{where} is stale: embeddings are now {emb.dim}-d, the index {manifest.dim}-d"
    added = sorted(set(hashes) - set(manifest.shards))
    removed = sorted(set(manifest.shards) - set(hashes))
    changed = sorted(s for s in set(hashes) & set(manifest.shards) if hashes[s] != manifest.shards[s])
    for what, names in (("changed", changed), ("was added", added), ("was removed", removed)):
        if names:
            return "stale", (
                f"{where} is stale: source shard {run.model_dir(model) / names[0]} {what} "
                "since the index was built"
            )
    if cfg is not None and _requested(cfg) != manifest.requested:
        return "stale", f"{where} was built with other index settings"
    return "fresh", f"{root} is up to date"


def _load_files(run: RunDir, model: str, manifest: IndexManifest, cfg: IndexConfig) -> ModelIndex:
    import faiss

    root = run.index_path(model)
    loc = root / INDEX_FILE
    blob = loc.read_bytes()
    ids_data = (root / IDS_FILE).read_bytes()
    for name, data in ((INDEX_FILE, blob), (IDS_FILE, ids_data)):
        problem = _file_problem(root, manifest, name, data)
        if problem:
            raise DataError(f"{problem}; rerun `flagsim index --models {model}`")
    try:
        cpu_index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    except RuntimeError as exc:
        raise DataError(f"{loc} is not a readable FAISS index: {str(exc).splitlines()[0]}") from None
    if cpu_index.d != manifest.dim or cpu_index.ntotal != manifest.count:
        raise DataError(
            f"{loc} holds {cpu_index.ntotal} x {cpu_index.d} vectors but its manifest says "
            f"{manifest.count} x {manifest.dim}"
        )
    try:
        table = pq.read_table(pa.BufferReader(ids_data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{root / IDS_FILE} is not a readable Parquet file: {exc}") from None
    if table.column_names[:2] != ["image_id", "name"] or table.num_rows != manifest.count:
        raise DataError(f"{root / IDS_FILE} does not match {loc} ({table.num_rows} ids)")
    ids = np.array(table.column("image_id").to_pylist(), dtype=object)
    names = np.array(table.column("name").to_pylist(), dtype=object)
    gpu = use_gpu(cfg) and _gpu_capable(manifest.kind)
    index = cpu_index
    if gpu:
        try:
            index = _to_gpu(cpu_index, manifest.kind)
        except (RuntimeError, AttributeError) as exc:
            log.warning("%s: searching on CPU (%s)", model, str(exc).splitlines()[0])
            gpu = False
    if not manifest.exact:
        _set_search_params(index, manifest.kind, manifest.params, gpu)
    return ModelIndex(model, index, ids, names, manifest, root, cpu_index=cpu_index if gpu else None)


def load_index(
    run_dir: str | RunDir, model: str, cfg: IndexConfig | None = None, *, build: bool = True,
    rebuild_on_settings: bool = False,
) -> ModelIndex:
    """The index of `model`: loaded when fresh, else (re)built when `build`, else DataError.

    Any fresh index is accepted whatever it was built with, unless `rebuild_on_settings`
    (then one built with settings other than `cfg` is rebuilt).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.at(run_dir)
    cfg = cfg or IndexConfig()
    state, reason = index_state(run, model, cfg if rebuild_on_settings else None)
    if state == "fresh":
        manifest = read_index_manifest(run, model)
        assert manifest is not None
        try:
            return _load_files(run, model, manifest, cfg)
        except DataError as exc:
            if not build:
                raise
            log.warning("%s; rebuilding", exc)
            return build_index(run, model, cfg)
    if not build:
        if state == "missing":
            raise DataError(f"{reason} for model {model} (run `flagsim index --models {model}`)")
        raise DataError(f"{reason}; rebuild with `flagsim index --models {model}`")
    if state == "stale":
        log.info("%s; rebuilding", reason)
    return build_index(run, model, cfg)


# --- ensemble --------------------------------------------------------------------------------


def read_sets(run: RunDir, models: Iterable[str]) -> dict[str, EmbeddingSet]:
    from flagsim.shards import read_embeddings

    return {m: read_embeddings(run, m) for m in models}


def ensemble_vectors(per_model: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenated normalised vectors scaled by 1/sqrt(M): their inner product = mean cosine."""
    if not per_model:
        raise ValueError("no models to ensemble")
    scale = np.float32(1.0 / math.sqrt(len(per_model)))
    return np.ascontiguousarray(
        np.concatenate([normalise(v) * scale for v in per_model.values()], axis=1)
    )


def build_ensemble(sets: Mapping[str, EmbeddingSet]) -> ModelIndex:
    """An exact in-memory index ranking by mean cosine over `sets`' models.

    Only images present in every model take part, in the first model's order.
    """
    import faiss

    if not sets:
        raise DataError("the ensemble needs at least one model")
    first = next(iter(sets.values()))
    common = set(first.ids)
    for s in sets.values():
        common &= set(s.ids)
    if not common:
        raise DataError(f"no image is present in all of the models {', '.join(sets)}")
    dropped = {m: len(s.ids) - len(common) for m, s in sets.items() if len(s.ids) != len(common)}
    if dropped:
        log.info("ensemble: %d images present in all models (%s)", len(common),
                 ", ".join(f"{m} has {n} more" for m, n in dropped.items()))
    order = [i for i in first.ids if i in common]
    names = dict(zip(first.ids, first.names, strict=True))
    parts = {}
    for m, s in sets.items():
        pos = {i: p for p, i in enumerate(s.ids)}
        parts[m] = s.vectors[[pos[i] for i in order]]
    mat = ensemble_vectors(parts)
    index = faiss.IndexFlatIP(mat.shape[1])
    index.add(mat)
    return ModelIndex(
        ENSEMBLE, index, np.array(order, dtype=object), np.array([names[i] for i in order], dtype=object)
    )


def ensemble_query(sets: Mapping[str, EmbeddingSet], image_ids: Sequence[str]) -> np.ndarray:
    """Ensemble query vectors of stored images (each must be in every model)."""
    per_model = {}
    for m, s in sets.items():
        pos = {i: p for p, i in enumerate(s.ids)}
        missing = [i for i in image_ids if i not in pos]
        if missing:
            raise DataError(f"{missing[0]} is not in the embeddings of model {m}")
        per_model[m] = s.vectors[[pos[i] for i in image_ids]]
    return ensemble_vectors(per_model)


def stored_vectors(s: EmbeddingSet, image_ids: Sequence[str]) -> np.ndarray:
    pos = {i: p for p, i in enumerate(s.ids)}
    return s.vectors[[pos[i] for i in image_ids]]
