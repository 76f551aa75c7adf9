"""An exact index that holds no vectors: each search streams a vector source, one shard at a time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np

from flagsim.errors import DataError
from flagsim.search.backend import merge_topk
from flagsim.search.source import Block


class BlockSource(Protocol):
    """Shards of normalised vectors, always in the same order (a ModelSource or EnsembleSource)."""

    @property
    def dim(self) -> int: ...

    def __iter__(self) -> Iterable[Block]: ...


class StreamedIndex:
    """Exact inner-product search over `source`, reading it shard by shard at every search.

    What a session uses for an ensemble of a subset of the run's models (it has no saved index):
    memory is the queries, one shard and the running top-k, whatever the collection's size; each
    `search` costs one pass over the shards, so callers search their queries in one call.
    Positions are row numbers in the source's order.
    """

    kind = "flat"
    params: dict = {}

    def __init__(self, source: BlockSource, count: int) -> None:
        self.source = source
        self._count = int(count)

    @property
    def dim(self) -> int:
        return int(self.source.dim)

    @property
    def count(self) -> int:
        return self._count

    @property
    def device(self) -> str:
        return "cpu"

    def train(self, vectors: np.ndarray) -> None:
        raise NotImplementedError("a streamed index is its source; it is not trained")

    def add(self, vectors: np.ndarray) -> None:
        raise NotImplementedError("a streamed index is its source; vectors are not added")

    def save(self, path: str) -> int:
        raise NotImplementedError("a streamed index is not saved")

    def nbytes(self) -> int:
        return 0  # it holds no vectors

    def reconstruct(self, position: int) -> np.ndarray | None:
        return None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        q = np.ascontiguousarray(queries, dtype=np.float32)
        best: tuple[np.ndarray, np.ndarray] = (np.zeros((len(q), 0), np.float32),
                                               np.zeros((len(q), 0), np.int64))
        offset = 0
        for block in self.source:
            n = len(block.vectors)
            if n and k > 0 and len(q):
                found = faiss.knn(q, np.ascontiguousarray(block.vectors, dtype=np.float32),
                                  min(k, n), metric=faiss.METRIC_INNER_PRODUCT)
                best = merge_topk([best, found], [0, offset], k)
            offset += n
        if offset != self._count:  # the shards changed since the ids were read
            raise DataError(f"the shards of {getattr(self.source, 'name', 'the source')} hold "
                            f"{offset} rows, not the {self._count} read before; run the command again")
        return best
