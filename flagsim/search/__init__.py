"""The search layer: index protocol and FAISS backend, builds, loads, neighbour tables and queries.

Modules, lowest first: `vectors` (normalisation), `catalog` (models and names of a run),
`manifest` (index files), `choice` (which index), `backend` (the `VectorIndex` protocol and
FAISS), `model_index` (a loaded index with ids), `source` (vectors read shard by shard), `build`,
`saved`, `load`, `session` (one run's search state), then the users: `neighbours`, `query`,
`compare`, `evaluate`, `batch`.
"""

from flagsim.search.catalog import ENSEMBLE, complete_models, resolve_models
from flagsim.search.model_index import Hit, ModelIndex

__all__ = ["ENSEMBLE", "Hit", "ModelIndex", "complete_models", "resolve_models"]
