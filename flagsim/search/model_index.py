"""A loaded, searchable index of one model: positions to ids and names, self-exclusion, padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flagsim.errors import DataError
from flagsim.search.backend import VectorIndex
from flagsim.search.columns import Column
from flagsim.search.manifest import IndexManifest
from flagsim.search.vectors import normalise
from flagsim.storage import Location


def check_k(k: int, model: str, count: int, *, exclude_self: bool = True, where: str = "") -> None:
    """One-line DataError when `k` neighbours cannot exist among `count` images of `model`.

    `where` names the run in the message (" of RUN") when the caller searches another run.
    A collection with no neighbours at all (one image, itself excluded) says so instead of
    naming a k the user may not have chosen (the config's default).
    """
    most = count - 1 if exclude_self else count
    if k < 1:
        raise DataError(f"k must be at least 1, got {k}")
    if most < 1:
        raise DataError(f"model {model}{where} has {count} image{'' if count == 1 else 's'}: "
                        f"no neighbours to find (at least {2 if exclude_self else 1} needed)")
    if k > most:
        raise DataError(
            f"k={k} is larger than the collection: model {model}{where} has {count} images, "
            f"so at most {most} neighbours each"
        )


@dataclass(frozen=True)
class Hit:
    """One neighbour of a query: 1-based rank, image id, display name and cosine similarity."""

    rank: int
    image_id: str
    name: str
    score: float


def finish_hits(scores: np.ndarray, pos: np.ndarray, excl: np.ndarray | None, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` (scores, positions) from a search that asked for k (+1 when `excl` is given).

    `excl[i]` (a position, or -2 for none) is dropped from row i; where it was not returned the
    extra last hit is dropped instead. Missing hits are padded with NaN / -1. Scores are
    clipped to [-1, 1] (FAISS's float32 sums put identical vectors up to ~1e-5 outside).
    """
    if excl is not None:
        hit = pos == excl[:, None]
        drop = hit.copy()
        if pos.shape[1] > k:  # asked for one extra: drop the last where the query was not returned
            drop[~hit.any(axis=1), -1] = True
        order = np.argsort(drop, axis=1, kind="stable")  # kept first, in rank order
        scores = np.take_along_axis(np.where(drop, np.nan, scores), order, 1)
        pos = np.take_along_axis(np.where(drop, -1, pos), order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
    scores = np.clip(scores[:, :k].astype(np.float32), -1.0, 1.0)  # float32 sums: 1.00001
    pos = pos[:, :k]
    scores[pos < 0] = np.nan
    return scores, pos


@dataclass
class ModelIndex:
    """A searchable cosine index of one model (or of the ensemble)."""

    model: str
    index: VectorIndex  # a FaissIndex (on its GPU copy when it has one), a PartedIndex
    # or, for the ensemble of a subset of the models, a StreamedIndex
    ids: Column  # image ids in index order (any sequence given is kept as an Arrow column)
    names: Column  # display names
    manifest: IndexManifest | None = None
    location: Location | None = None

    def __post_init__(self) -> None:
        self.ids = Column(self.ids)
        self.names = Column(self.names)

    @property
    def count(self) -> int:
        return int(self.index.count)

    @property
    def dim(self) -> int:
        return int(self.index.dim)

    def position(self, image_id: str) -> int | None:
        return self.ids.index(image_id)

    def positions(self, image_ids: Sequence[str | None]) -> np.ndarray:
        """Position of each id (-1 where absent or None), vectorised."""
        return self.ids.positions(image_ids)

    def __contains__(self, image_id: str) -> bool:
        return self.position(image_id) is not None

    def check_k(self, k: int, exclude_self: bool = True) -> None:
        """One-line DataError when `k` neighbours cannot exist in this collection."""
        check_k(k, self.model, self.count, exclude_self=exclude_self)

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
            excl = self.positions(exclude)
            excl[excl < 0] = -2  # never equal to a returned position (-1 pads)
        kk = min(k + (1 if excl is not None else 0), self.count)
        scores, pos = self.index.search(q, kk)
        return finish_hits(scores, pos, excl, k)

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
