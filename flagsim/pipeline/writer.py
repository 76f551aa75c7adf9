"""Writer: collect streamed rows into complete shards and write each shard atomically per model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from flagsim.pipeline.mapper import embedding_column
from flagsim.pipeline.plan import ShardPlan
from flagsim.pipeline.reader import ERROR, OK, POS
from flagsim.rundir import RunDir
from flagsim.schema import ERRORS_SCHEMA
from flagsim.shards import embeddings_table, write_shard

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    count: int  # rows of the shard
    ids: list[str] | None = None  # image ids in images-table order, when the table is given
    rows: dict = field(default_factory=dict)  # by `pos` (row number), else by image id


class ShardWriter:
    """Buffers rows by shard; when every row of a shard has arrived, writes that shard.

    Rows are keyed by their row number in the images table (the read stage's `pos` column), or
    by image id when the batches have none and `images` is given, so a batch retried by Ray
    (e.g. after an actor died) can never produce a duplicate row, and a shard's rows are
    written in table order. Only (model, shard) pairs in `todo` are written. The driver holds
    the rows of the shards in flight, never the images table.
    """

    def __init__(
        self,
        run: RunDir,
        images: pa.Table | None,
        plans: list[ShardPlan],
        todo: dict[str, set[int]],
        on_shard: Callable[[int, int], None] | None = None,
    ) -> None:
        self.run = run
        self.todo = todo
        self.on_shard = on_shard
        if images is None:
            self.pending = {p.index: _Pending(p.rows) for p in plans}
        else:
            ids = images.column("image_id").to_pylist()
            self.pending = {p.index: _Pending(p.rows, ids[p.start : p.stop]) for p in plans}
        self.rows_written: dict[str, int] = dict.fromkeys(todo, 0)
        self.errors = 0
        self.shards_done = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shards = np.asarray(batch["shard"])
        pos = np.asarray(batch[POS]) if POS in batch else None
        for i in range(len(shards)):
            shard = int(shards[i])
            pend = self.pending.get(shard)
            if pend is None:  # already flushed: a retried duplicate
                continue
            row = {
                "image_id": str(batch["image_id"][i]),
                "name": str(batch["name"][i]),
                "path": str(batch["path"][i]),
                OK: bool(batch[OK][i]),
                ERROR: str(batch[ERROR][i]),
            }
            for model in self.todo:
                col = embedding_column(model)
                if col in batch:
                    row[col] = np.asarray(batch[col][i], dtype=np.float32)
            pend.rows[int(pos[i]) if pos is not None else row["image_id"]] = row
            if len(pend.rows) == pend.count:
                self._flush(shard)

    def _flush(self, shard: int) -> None:
        pend = self.pending.pop(shard)
        if pend.ids is not None and not isinstance(next(iter(pend.rows)), int):
            rows = [pend.rows[i] for i in pend.ids]
        else:
            rows = [pend.rows[k] for k in sorted(pend.rows)]
        good = np.array([r[OK] for r in rows], dtype=bool)
        ids = [r["image_id"] for r in rows if r[OK]]
        names = [r["name"] for r in rows if r[OK]]
        for model, shards in self.todo.items():
            if shard not in shards:
                continue
            col = embedding_column(model)
            vectors = np.stack([r[col] for r in rows])[good]  # bad rows carry zero vectors
            write_shard(self.run, model, shard, embeddings_table(ids, names, model, vectors))
            self.rows_written[model] += len(ids)
        bad = [r for r in rows if not r[OK]]
        self._write_errors(shard, bad)
        self.errors += len(bad)
        self.shards_done += 1
        if self.on_shard:
            self.on_shard(shard, len(rows))

    def _write_errors(self, shard: int, bad: list[dict]) -> None:
        loc = self.run.errors_dir("embed") / f"part-{shard:05d}.parquet"
        if not bad:
            if loc.exists():
                loc.delete()
            return
        table = pa.Table.from_pylist(
            [
                {"image_id": r["image_id"], "name": r["name"], "path": r["path"],
                 "stage": "decode", "model": None, "reason": r[ERROR]}
                for r in bad
            ],
            schema=ERRORS_SCHEMA,
        )
        loc.write_parquet(table, staging=self.run.staging)
        for r in bad:
            log.warning("skipped %s: %s", r["path"], r[ERROR])

    @property
    def incomplete(self) -> list[int]:
        return sorted(self.pending)
