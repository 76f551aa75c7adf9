"""The index protocol flagsim searches through, and its FAISS implementation (CPU or GPU)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from flagsim.config import IndexConfig
from flagsim.errors import ConfigError, DataError

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: noise

GPU_MAX_K = 2048  # FAISS GPU indexes return at most this many results per query
KINDS = ("flat", "ivf", "ivfpq", "hnsw")


@runtime_checkable
class VectorIndex(Protocol):
    """What the product needs from an index of L2-normalised vectors (inner product = cosine).

    Positions are 0-based in the order vectors were added; `search` pads missing results with
    position -1 (and any score).
    """

    kind: str

    @property
    def dim(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def device(self) -> str: ...  # "cpu" | "gpu"

    def train(self, vectors: np.ndarray) -> None: ...

    def add(self, vectors: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, path: str) -> int: ...  # a local file; returns its size in bytes

    def nbytes(self) -> int: ...

    def reconstruct(self, position: int) -> np.ndarray | None: ...  # None: vectors not kept


# --- GPU -------------------------------------------------------------------------------------

_GPU_RESOURCES: Any = None


def set_threads(threads: int) -> int:
    """Let FAISS use `threads` OpenMP threads on the calling thread (at most the machine's cores);
    the number set. A Ray task or actor starts with OMP_NUM_THREADS set to its num_cpus
    (1 unless asked), so the code that runs FAISS in one sets its own share."""
    import faiss

    threads = max(1, min(int(threads), os.cpu_count() or 1))
    faiss.omp_set_num_threads(threads)
    return threads


def omp_threads() -> int:
    """The OpenMP threads FAISS would use on the calling thread now."""
    import faiss

    return int(faiss.omp_get_max_threads())


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


def gpu_capable(kind: str) -> bool:
    """Kinds FAISS can search on a GPU (HNSW is CPU only)."""
    return kind in ("flat", "ivf", "ivfpq")


def to_gpu(index: Any, kind: str, float16: bool | None = None) -> Any:
    """A copy of the FAISS `index` on GPU 0.

    float16 storage/intermediates: for IVF-PQ always (its large codes need them); for Flat and
    IVF-Flat only when asked (`float16=True`, the GPU check's fp16 flat).
    """
    import faiss

    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = kind == "ivfpq" if float16 is None else bool(float16)
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index, opts)


def set_search_params(index: Any, kind: str, params: Mapping[str, Any], on_gpu: bool) -> None:
    import faiss

    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    if kind in ("ivf", "ivfpq"):
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw":
        space.set_index_parameter(index, "efSearch", int(params["ef_search"]))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- the FAISS implementation ----------------------------------------------------------------


def mmap_flags() -> int:
    """`faiss.read_index` flags that map a file instead of copying it into memory.

    `IO_FLAG_MMAP_IFC` (FAISS >= 1.10) maps every kind's data zero-copy; the older
    `IO_FLAG_MMAP` only maps inverted lists, through `OnDiskInvertedLists`, whose IVF search
    measured 1.8x slower (100k x 256, nprobe 32). Against the same file read into memory, no
    kind searched consistently faster either way (2 threads, side by side): IVF4000,Flat at
    1M x 256 (nprobe 32) 1.1x faster mapped, IVF1264,Flat at 100k 1.1-1.2x slower mapped;
    flat, HNSW32 and IVF1264,PQ64 at 100k within 2%.
    """
    import faiss

    return int(getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP))


class FaissIndex:
    """A FAISS index of one kind (flat, ivf, ivfpq, hnsw), on the CPU or copied to GPU 0.

    Files are written with `faiss.write_index` straight to disk and read back memory-mapped
    (`IO_FLAG_MMAP_IFC`: zero-copy views of the flat codes, HNSW graph and inverted lists), so
    neither saving nor loading holds a second in-memory copy of the vectors.
    """

    def __init__(self, cpu: Any, kind: str, params: Mapping[str, Any] | None = None,
                 gpu: Any = None, mapped: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        self.kind = kind
        self.params = dict(params or {})
        self._cpu = cpu  # None while the index lives only on the GPU (built there)
        self._gpu = gpu
        self.mapped = mapped  # the CPU index's data is a memory-mapped file
        self._warned_k = False

    # --- construction ---
    @classmethod
    def create(cls, dim: int, kind: str, factory: str, params: Mapping[str, Any],
               on_gpu: bool = False) -> FaissIndex:
        """An empty (untrained) index from a `faiss.index_factory` string."""
        import faiss

        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if kind == "hnsw":
            faiss.downcast_index(index).hnsw.efConstruction = int(params["ef_construction"])
        elif kind == "ivfpq":
            # polysemous training (on by default) only serves Hamming-filtered search and
            # costs minutes even on small data
            faiss.downcast_index(index).do_polysemous_training = False
        if on_gpu:
            return cls(None, kind, params, gpu=to_gpu(index, kind))
        return cls(index, kind, params)

    @classmethod
    def load(cls, path: str, kind: str, params: Mapping[str, Any], *, gpu: bool = False,
             mmap: bool = True) -> FaissIndex:
        """Read a saved index (memory-mapped unless `mmap=False`), optionally copied to GPU."""
        import faiss

        flags = 0
        if mmap:
            flags = mmap_flags()
        try:
            cpu = faiss.read_index(os.fspath(path), flags)
        except RuntimeError as exc:
            raise DataError(f"{path} is not a readable FAISS index: {_first_line(exc)}") from None
        out = cls(cpu, kind, params, mapped=bool(mmap))
        out.set_search_params()
        if gpu and gpu_capable(kind):
            try:
                out._gpu = to_gpu(cpu, kind)
                out.set_search_params()
            except (RuntimeError, AttributeError) as exc:
                log.warning("searching on CPU (%s)", _first_line(exc))
        return out

    # --- protocol ---
    @property
    def faiss_index(self) -> Any:
        """The FAISS index searches run on (the GPU copy when there is one)."""
        return self._gpu if self._gpu is not None else self._cpu

    @property
    def cpu_index(self) -> Any:
        """The index on the CPU (copied back from the GPU when it was built there)."""
        if self._cpu is None:
            import faiss

            self._cpu = faiss.index_gpu_to_cpu(self._gpu)
            set_search_params(self._cpu, self.kind, self.params, on_gpu=False)
        return self._cpu

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def count(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def device(self) -> str:
        return "gpu" if self._gpu is not None else "cpu"

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def train(self, vectors: np.ndarray) -> None:
        if self.kind in ("ivf", "ivfpq"):
            self.faiss_index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, vectors: np.ndarray) -> None:
        self.faiss_index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def set_search_params(self) -> None:
        if self.kind != "flat":
            set_search_params(self.faiss_index, self.kind, self.params, self._gpu is not None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], positions [q, k]); k above the GPU limit runs on the CPU copy."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        index = self.faiss_index
        if self._gpu is not None and k > GPU_MAX_K:
            if not self._warned_k:
                log.info("k=%d is above FAISS's GPU limit of %d: searching on the CPU", k, GPU_MAX_K)
                self._warned_k = True
            index = self.cpu_index
        return index.search(q, k)

    def save(self, path: str) -> int:
        """Write the (CPU) index to the local file `path` directly; return its size."""
        import faiss

        faiss.write_index(self.cpu_index, os.fspath(path))
        return os.path.getsize(path)

    def nbytes(self) -> int:
        """Bytes the index's data takes (its serialised size, computed without serialising)."""
        return index_nbytes(self.kind, self.count, self.dim, self.params)

    def reconstruct(self, position: int) -> np.ndarray | None:
        """The stored (normalised) vector at `position` for flat and HNSW indexes, else None."""
        if self.kind not in ("flat", "hnsw"):
            return None
        return np.asarray(self.cpu_index.reconstruct(int(position)), dtype=np.float32)


def index_nbytes(kind: str, n: int, dim: int, params: Mapping[str, Any]) -> int:
    """Approximate data size of an index: vectors or codes, graph links, list ids, centroids."""
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + int(params.get("hnsw_m", 32)) * 2 * 4 + 8)
    nlist = int(params.get("nlist", 1))
    if kind == "ivf":
        return n * (dim * 4 + 8) + nlist * dim * 4
    return n * (int(params.get("pq_m", 8)) + 8) + nlist * dim * 4 + 256 * dim * 4


class PartedIndex:
    """Several indexes over contiguous position ranges, searched as one: each part's top-k,
    shifted by its offset, merged exactly by score (what FAISS's IndexShards does)."""

    def __init__(self, parts: list[FaissIndex], offsets: list[int]) -> None:
        if not parts or len(parts) != len(offsets):
            raise ValueError("a parted index needs one offset per part")
        self.parts, self.offsets = parts, offsets
        self.kind = parts[0].kind
        self.params = parts[0].params

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    @property
    def count(self) -> int:
        return sum(p.count for p in self.parts)

    @property
    def device(self) -> str:
        return self.parts[0].device

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def train(self, vectors: np.ndarray) -> None:
        raise NotImplementedError("parts are trained and filled when the index is built")

    def add(self, vectors: np.ndarray) -> None:
        raise NotImplementedError("parts are trained and filled when the index is built")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk([p.search(queries, min(k, max(p.count, 1))) for p in self.parts],
                          self.offsets, k)

    def save(self, path: str) -> int:
        raise NotImplementedError("a parted index is saved part by part")

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)

    def reconstruct(self, position: int) -> np.ndarray | None:
        for part, off in zip(self.parts, self.offsets, strict=True):
            if off <= position < off + part.count:
                return part.reconstruct(position - off)
        return None


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], offsets: list[int], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of several (scores, positions) results over disjoint ranges."""
    scores = np.concatenate([s for s, _ in results], axis=1)
    pos = np.concatenate([np.where(p >= 0, p + off, -1) for (_, p), off in zip(results, offsets,
                                                                             strict=True)], axis=1)
    key = np.where(pos >= 0, scores, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(pos, order, 1)
