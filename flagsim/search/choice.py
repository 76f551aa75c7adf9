"""Which FAISS index a collection gets: the kind, its factory string and parameters (docs/query.md)."""

from __future__ import annotations

import logging
import math
from typing import Any

from flagsim.config import IndexConfig
from flagsim.errors import ConfigError

log = logging.getLogger(__name__)

HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128


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


# Measured on a 2-core CPU (docs/benchmarks.md, "neighbour tables"): one IVF-Flat distance
# (inverted-list scan plus the coarse quantiser) costs about this many exact (GEMM) distances.
# With nlist = 4*sqrt(n) and nprobe = 32 that puts the time crossover of all-vs-all search at
# n = (IVF_COST_PER_FLAT * 12)^2 (about 130k vectors), whatever the dimension.
IVF_COST_PER_FLAT = 30.0


def exact_crossover(nprobe: int = 32) -> int:
    """Rows above which the default IVF-Flat searches faster than exact search (the measured
    cost model above: exact scans n vectors per query, IVF nlist + nprobe * n / nlist)."""
    # n = r * (4 sqrt(n) + nprobe * sqrt(n) / 4)  =>  sqrt(n) = r * (4 + nprobe / 4)
    return int((IVF_COST_PER_FLAT * (4 + nprobe / 4)) ** 2)


def choose_kind(n: int, dim: int, cfg: IndexConfig) -> str:
    """The index kind for `n` vectors of `dim` floats under `cfg` (see docs/query.md).

    `auto`: exact `flat` up to the measured time crossover (`exact_crossover`, or
    `exact_max_rows` when set); above it `ivf` (IVF-Flat: exact distances, probes `nprobe`
    lists) while the vectors fit `max_parts` parts of `memory_budget_gb`; else `ivfpq`
    (compressed codes). HNSW is used only when asked for (`kind: hnsw`). Any kind larger than
    the budget is built as several parts (see `parts_needed`).
    """
    if cfg.kind != "auto":
        return cfg.kind
    limit = cfg.exact_max_rows if cfg.exact_max_rows is not None else exact_crossover(cfg.nprobe)
    if n <= limit:
        return "flat"
    if flat_bytes(n, dim) + 8 * n <= cfg.memory_budget_gb * 1024**3 * cfg.max_parts:
        return "ivf"
    return "ivfpq"


def plan_index(n: int, dim: int, cfg: IndexConfig) -> tuple[str, str, dict[str, Any]]:
    """(kind, factory string, params) for the collection."""
    kind = choose_kind(n, dim, cfg)
    budget = cfg.memory_budget_gb * 1024**3
    params: dict[str, Any] = {}
    if kind == "flat":
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
    if n * (pq_m + 8) > budget * cfg.max_parts:
        raise ConfigError(
            f"{n} vectors do not fit index.max_parts={cfg.max_parts} parts of "
            f"index.memory_budget_gb={cfg.memory_budget_gb} even as {pq_m}-byte PQ codes; "
            "raise either"
        )
    params.update(pq_m=pq_m, pq_bits=8)
    return kind, f"IVF{nlist},PQ{pq_m}", params


def parts_needed(kind: str, n: int, dim: int, params: dict[str, Any], cfg: IndexConfig) -> int:
    """How many index parts keep each part's peak memory within `index.memory_budget_gb`.

    The peak of building or searching one part is its data plus the training sample and one
    query batch (see `build_peak_bytes`); a part holds a contiguous range of positions.
    """
    budget = cfg.memory_budget_gb * 1024**3
    from flagsim.search.backend import index_nbytes

    data = index_nbytes(kind, n, dim, params)
    overhead = build_overhead_bytes(kind, n, dim, params)
    room = budget - overhead
    if room <= 0:
        raise ConfigError(
            f"index.memory_budget_gb={cfg.memory_budget_gb} is below the {overhead / 1024**3:.2f} GB "
            "a build needs besides the index (training sample and one batch); raise it"
        )
    parts = max(1, min(n, math.ceil(data / room)))
    if parts > cfg.max_parts:
        raise ConfigError(
            f"a {kind} index of {n} x {dim} needs {parts} parts of index.memory_budget_gb="
            f"{cfg.memory_budget_gb}, more than index.max_parts={cfg.max_parts}; raise either, "
            "or use kind: ivfpq"
        )
    return parts


def build_overhead_bytes(kind: str, n: int, dim: int, params: dict[str, Any]) -> int:
    """Memory a build holds besides the index data: the training sample (IVF kinds), the
    recall sample, and one shard of vectors being added (at most 64k rows assumed)."""
    train = 0
    if kind in ("ivf", "ivfpq"):
        train = min(n, max(64 * int(params.get("nlist", 1)), 256 * 39 if kind == "ivfpq" else 0))
    return (train + min(n, 1000) + min(n, 65536)) * dim * 4


#: kinds whose build reads the vectors before filling the index (training or recall sample)
SAMPLED_KINDS = ("ivf", "ivfpq", "hnsw")
#: a held row's id and name as Python strings, about (for the budget only)
HELD_ROW_BYTES = 160


def held_vectors_bytes(kind: str, n: int, dim: int, params: dict[str, Any], cfg: IndexConfig
                       ) -> int:
    """Memory a build keeps from its sampling pass so that it fills the index without reading
    the shards a second time: every row (vectors, ids, names) when the index is one part and
    they fit `index.memory_budget_gb` beside the build's peak, else 0 (the shards are read
    twice). Exact `flat` builds read the shards once anyway."""
    if kind not in SAMPLED_KINDS or parts_needed(kind, n, dim, params, cfg) > 1:
        return 0
    held = n * (dim * 4 + HELD_ROW_BYTES)
    fits = _part_peak_bytes(kind, n, dim, params, 1) + held <= cfg.memory_budget_gb * 1024**3
    return held if fits else 0


def _part_peak_bytes(kind: str, n: int, dim: int, params: dict[str, Any], parts: int) -> int:
    """One part's index data (the largest of `parts`) and the build's overhead."""
    from flagsim.search.backend import index_nbytes

    return (index_nbytes(kind, math.ceil(n / parts), dim, params)
            + build_overhead_bytes(kind, n, dim, params))


def build_peak_bytes(n: int, dim: int, cfg: IndexConfig) -> int:
    """The most memory one build of `n` x `dim` holds: one part's index data (the largest, when
    `parts_needed` splits it), the training sample, the recall sample, one shard being added
    and the rows held from the sampling pass (`held_vectors_bytes`). Within
    `index.memory_budget_gb`, and what an index build task reserves from Ray."""
    kind, _, params = plan_index(n, dim, cfg)
    parts = parts_needed(kind, n, dim, params, cfg)
    return _part_peak_bytes(kind, n, dim, params, parts) + held_vectors_bytes(kind, n, dim,
                                                                               params, cfg)
