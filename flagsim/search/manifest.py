"""The saved index's files and manifest: what it holds, how it was built, and checks of its files."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flagsim import __version__
from flagsim.config import IndexConfig
from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.storage import Location

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST_FILE = "_manifest.json"
METRIC = "cosine"  # inner product of L2-normalised vectors
RECALL_K = 10  # recall@10 is measured for approximate indexes


def part_file(i: int, parts: int) -> str:
    """The file of index part `i`: `index.faiss` for a one-part index, else `index-NNNNN.faiss`."""
    return INDEX_FILE if parts == 1 else f"index-{i:05d}.faiss"


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
    build_threads: int | None = None  # FAISS's CPU threads while building (training, adding)
    index_bytes: int | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # index file -> size, sha256
    # the index files, each a contiguous range of positions: file, offset, count, size
    parts: list[dict[str, Any]] = field(default_factory=list)
    source_models: list[str] = field(default_factory=list)  # the ensemble's models (else [model])
    flagsim_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexManifest:
        if not isinstance(data, dict):
            raise DataError(f"{where} is not a valid index manifest")
        try:
            manifest = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as exc:
            raise DataError(f"{where} is not a valid index manifest: {exc}") from exc
        problem = manifest._type_problem()
        if problem:
            raise DataError(f"{where} is not a valid index manifest: {problem}; rebuild it with "
                            f"`flagsim index --force --models {manifest.model}`")
        return manifest

    def _type_problem(self) -> str | None:
        """The first field whose type is not what flagsim writes (an edited or damaged file)."""
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not isinstance(self.model, str) or not whole(self.dim) or not whole(self.count):
            return "'model', 'dim' or 'count' has the wrong type"
        if self.kind not in ("flat", "ivf", "hnsw", "ivfpq") or not isinstance(self.factory, str):
            return f"unknown index kind {self.kind!r}"
        for name in ("shards", "params", "requested", "files"):
            if not isinstance(getattr(self, name), dict):
                return f"{name!r} is not a mapping"
        if not all(isinstance(f, dict) for f in self.files.values()):
            return "'files' holds a record that is not a mapping"
        if not isinstance(self.parts, list) or not all(
                isinstance(p, dict) and isinstance(p.get("file"), str) and whole(p.get("offset"))
                and whole(p.get("count")) for p in self.parts):
            return "'parts' is not a list of {file, offset, count} records"
        if not isinstance(self.source_models, list):
            return "'source_models' is not a list"
        return None


def requested(cfg: IndexConfig) -> dict[str, Any]:
    """The settings that decide what gets built (use_gpu only decides where)."""
    return cfg.model_dump(exclude={"use_gpu"})


def read_index_manifest(run: RunDir, model: str) -> IndexManifest | None:
    loc = run.index_path(model) / MANIFEST_FILE
    if not loc.exists():
        return None
    manifest = IndexManifest.from_json(loc.read_json(), str(loc))
    if manifest.model != model:
        raise DataError(f"{loc} describes the index of model {manifest.model}, not {model}")
    return manifest


def sha256_of(loc: Location, chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (memory stays one chunk whatever the size)."""
    h = hashlib.sha256()
    with loc.fs.open_input_stream(loc.path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_problem(root: Location, manifest: IndexManifest, name: str, data: bytes | None = None,
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
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_of(loc)
        if digest != record["sha256"]:
            return f"{loc} does not match the sha256 in {where} (corrupt or replaced)"
    return None
