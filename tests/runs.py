"""Test helper: a run directory whose embeddings are given vectors (shards and manifest, no Ray)."""

from __future__ import annotations

import numpy as np

from flagsim.rundir import RunDir
from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard


def make_run(root, model: str, vectors: np.ndarray, shard_size: int = 100, ids=None) -> RunDir:
    """A run with `vectors` as `model`'s embeddings, split into shards, manifest last.

    Ids default to `img00000`, `img00001`, …; names are `Image <id>`.
    """
    run = RunDir.at(str(root))
    n, dim = vectors.shape
    ids = ids or [f"img{i:05d}" for i in range(n)]
    shards = {}
    for s, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        table = embeddings_table(ids[start:stop], [f"Image {i}" for i in ids[start:stop]], model,
                                 vectors[start:stop])
        shards[write_shard(run, model, s, table).name] = table.num_rows
    write_manifest(run, Manifest(model=model, dim=dim, rows=n, images_hash="test", shards=shards,
                                 source="test"))
    return run
