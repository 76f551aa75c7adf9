"""One run's search state, loaded once: indexes (memory-mapped), names, stored vectors by id, ensemble.

`query`, `compare`, `eval` and the report all search through a `RunSearch`: each index is
loaded (or built) once, names come from the indexes' id tables, and a stored vector is read
from the one shard that holds it (or from the mapped index itself), never by reading every
embedding of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from flagsim.config import Config, IndexConfig
from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.search.catalog import ENSEMBLE, Catalogue, complete_models, resolve_models
from flagsim.search.load import load_index
from flagsim.search.model_index import Hit, ModelIndex
from flagsim.search.source import EnsembleSource, ModelSource
from flagsim.search.streamed import StreamedIndex
from flagsim.search.vectors import ensemble_vectors, normalise
from flagsim.shards import Manifest

log = logging.getLogger(__name__)


class RunSearch:
    """Search the models of one run (and their ensemble `all`)."""

    def __init__(self, run: RunDir | str, models: Sequence[str] | None = None,
                 cfg: Config | IndexConfig | None = None, *, build: bool = True) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir.at(run)
        self.models = resolve_models(self.run, models)
        # the whole configuration says where a missing index is built: on its Ray cluster
        # (RAY_ADDRESS or ray.address) as a task, else here; index settings alone build here
        # unless RAY_ADDRESS is set
        self.config = cfg if isinstance(cfg, Config) else Config(index=cfg or IndexConfig())
        self.cfg = self.config.index
        self.build = build
        self._indexes: dict[str, ModelIndex] = {}
        self._sources: dict[str, ModelSource] = {}

    # --- indexes ---
    def index(self, model: str) -> ModelIndex:
        """The index of `model` (or of the ensemble), loaded or built on first use."""
        if model not in self._indexes:
            if model == ENSEMBLE:
                self._indexes[model] = self._ensemble_index()
            else:
                self._indexes[model] = load_index(self.run, model, self.cfg, build=self.build,
                                                   cluster=self.config)
        return self._indexes[model]

    @property
    def has_ensemble(self) -> bool:
        return len(self.models) > 1

    def _ensemble_index(self) -> ModelIndex:
        """The run's saved `all` index when the session covers every model; for a subset of
        the models an exact ensemble of just those (not saved, so it never replaces
        the run's own), searched by streaming their shards (`StreamedIndex`). With one model,
        that model's index under the ensemble's name."""
        if not self.has_ensemble:  # the mean cosine of one model is its own ranking
            import dataclasses

            return dataclasses.replace(self.index(self.models[0]), model=ENSEMBLE)
        if sorted(self.models) == sorted(complete_models(self.run)):
            return load_index(self.run, ENSEMBLE, self.cfg, build=self.build, cluster=self.config)
        src = EnsembleSource(self.run, self.models)
        ids, names = src.ids_names()
        if len(ids) == 0:
            raise DataError(f"no image is present in all of the models {', '.join(self.models)}")
        if short := src.shortfall(len(ids)):
            log.warning("%s", short)
        # exact and streamed: the driver holds the ids and names, never the vectors
        return ModelIndex(ENSEMBLE, StreamedIndex(src, len(ids)), ids, names)

    def source(self, model: str) -> ModelSource:
        if model not in self._sources:
            self._sources[model] = ModelSource(self.run, model)
        return self._sources[model]

    def manifest(self, model: str) -> Manifest:
        """The embedding manifest of `model` (checkpoint, revision, dim, ...)."""
        return self.source(model).manifest

    # --- names ---
    @cached_property
    def catalogue(self) -> Catalogue:
        """Ids and display names of every image of the session's models: from the id table of a
        fresh index, else from the shards' two id columns (a name is resolved, or refused,
        before any index is built)."""
        from flagsim.search.saved import index_state

        sets = []
        for m in self.models:
            if m in self._indexes or index_state(self.run, m)[0] == "fresh":
                sets.append(self.index(m))
            else:
                sets.append(self.source(m).names_table())
        return Catalogue.of(sets)

    # --- stored vectors ---
    def vectors(self, model: str, image_ids: Sequence[str]) -> np.ndarray:
        """Normalised stored vectors of `image_ids` (each must be in `model`), [len, dim].

        Read from the mapped index when it keeps whole vectors (flat, HNSW), else from the
        shards that hold them (only those shards are read). The ensemble's are the models'
        own, combined as `ensemble_vectors` does.
        """
        if model == ENSEMBLE:
            return ensemble_vectors({m: self.vectors(m, image_ids) for m in self.models})
        idx = self.index(model)
        found = idx.positions(list(image_ids))
        if (found < 0).any():
            missing = list(image_ids)[int(np.argmax(found < 0))]
            raise DataError(f"{missing} is not in the embeddings of model {model}")
        pos = [int(p) for p in found]
        if not pos:
            return np.zeros((0, idx.dim), np.float32)
        first = idx.index.reconstruct(pos[0])
        if first is not None:
            return np.stack([first, *(idx.index.reconstruct(p) for p in pos[1:])]).astype(np.float32)
        return self._from_shards(model, pos)

    def _from_shards(self, model: str, positions: Sequence[int]) -> np.ndarray:
        """Rows at index `positions` (= shard order) read from the shards holding them."""
        src = self.source(model)
        shard_of, rows = zip(*sorted(src.shard_rows().items()), strict=True)
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
        pos = np.asarray(positions, dtype=np.int64)
        which = np.searchsorted(starts, pos, side="right") - 1  # the shard of each position
        out = np.zeros((len(pos), src.dim), np.float32)
        for s in np.unique(which):
            sel = np.nonzero(which == s)[0]
            out[sel] = src.read(shard_of[s]).vectors[pos[sel] - starts[s]]
        return normalise(out)

    def contains(self, model: str, image_id: str) -> bool:
        return image_id in self.index(model)

    # --- search ---
    def hits(self, model: str, image_ids: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-k of stored images (each excluded from its own results)."""
        idx = self.index(model)
        return idx.hits(self.vectors(model, image_ids), k, exclude=list(image_ids))

    def search(self, model: str, image_ids: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of stored images' top-k, each excluding itself."""
        idx = self.index(model)
        return idx.search(self.vectors(model, image_ids), k, exclude=list(image_ids), normalised=True)
