"""The ensemble ranking `all`: mean cosine over the models present, as one exact index."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.search.backend import FaissIndex
from flagsim.search.catalog import ENSEMBLE
from flagsim.search.model_index import ModelIndex
from flagsim.search.vectors import ensemble_vectors
from flagsim.shards import EmbeddingSet

log = logging.getLogger(__name__)


def read_sets(run: RunDir, models: Iterable[str]) -> dict[str, EmbeddingSet]:
    from flagsim.shards import read_embeddings

    return {m: read_embeddings(run, m) for m in models}


def build_ensemble(sets: Mapping[str, EmbeddingSet]) -> ModelIndex:
    """An exact in-memory index ranking by mean cosine over `sets`' models.

    Only images present in every model take part, in the first model's order.
    """
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
    index = FaissIndex.create(mat.shape[1], "flat", "Flat", {})
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
