"""Shard writer and shard I/O without Ray: complete shards only, no duplicates, loud NaN/Inf."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flagsim.errors import DataError
from flagsim.pipeline.mapper import embedding_column
from flagsim.pipeline.reader import plan_shards
from flagsim.pipeline.writer import ShardWriter
from flagsim.rundir import RunDir
from flagsim.schema import IMAGES_SCHEMA, embedding_schema
from flagsim.shards import embeddings_table
from flagsim.storage import Location


def _images(n: int) -> pa.Table:
    rows = [{"image_id": f"img{i}", "name": f"Image {i}", "path": f"/x/img{i}.png"} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)


def _batch(ids: list[int], shard_size: int, ok: bool = True, dim: int = 3) -> dict[str, np.ndarray]:
    return {
        "image_id": np.array([f"img{i}" for i in ids], dtype=object),
        "name": np.array([f"Image {i}" for i in ids], dtype=object),
        "path": np.array([f"/x/img{i}.png" for i in ids], dtype=object),
        "shard": np.array([i // shard_size for i in ids], dtype=np.int32),
        "ok": np.array([ok] * len(ids)),
        "error": np.array(["" if ok else "corrupt image: x"] * len(ids), dtype=object),
        embedding_column("m"): np.array([[i, i + 0.5, -i] for i in ids], dtype=np.float32)[:, :dim],
    }


def test_shard_is_written_once_complete_in_table_order_without_duplicates(tmp_path):
    run = RunDir.at(tmp_path)
    images = _images(5)
    plans = plan_shards(5, 3)
    written = []
    w = ShardWriter(run, images, plans, {"m": {0, 1}}, on_shard=lambda s, n: written.append((s, n)))
    w.add(_batch([2, 0], 3))
    assert written == [] and not run.shard("m", 0).exists()  # incomplete: nothing on disk
    w.add(_batch([0, 1], 3))  # img0 again: a retried batch must not duplicate it
    assert written == [(0, 3)]
    t = pq.read_table(run.shard("m", 0).path)
    assert t.schema.equals(embedding_schema(3))
    assert t.column("image_id").to_pylist() == ["img0", "img1", "img2"]
    w.add(_batch([0], 3))  # a late duplicate of a flushed shard is ignored
    w.add(_batch([4, 3], 3))
    assert [s for s, _ in written] == [0, 1] and w.incomplete == []
    assert w.rows_written == {"m": 5}


def test_only_missing_shards_are_written_and_failures_go_to_errors(tmp_path):
    run = RunDir.at(tmp_path)
    w = ShardWriter(run, _images(4), plan_shards(4, 2), {"m": {1}})
    w.add(_batch([0, 1], 2))
    w.add(_batch([2], 2))
    w.add(_batch([3], 2, ok=False))
    assert not run.shard("m", 0).exists()  # already done in an earlier run: left alone
    assert pq.read_table(run.shard("m", 1).path).column("image_id").to_pylist() == ["img2"]
    errs = pq.read_table((run.errors_dir("embed") / "part-00001.parquet").path).to_pylist()
    assert [(e["image_id"], e["stage"], e["reason"]) for e in errs] == [
        ("img3", "decode", "corrupt image: x")]
    assert w.errors == 1


def test_nan_or_inf_embeddings_are_rejected_loudly():
    with pytest.raises(DataError, match="NaN/Inf embeddings for b"):
        embeddings_table(["a", "b"], ["A", "B"], "m", np.array([[1.0, 2.0], [np.nan, 0.0]]))
    with pytest.raises(DataError, match="NaN/Inf"):
        embeddings_table(["a"], ["A"], "m", np.array([[np.inf, 0.0]]))


def test_atomic_write_leaves_no_temporary_files_and_replaces_whole(tmp_path):
    loc = Location.parse(tmp_path / "sub" / "file.json")
    loc.write_json({"a": 1})
    loc.write_json({"a": 2})
    assert loc.read_json() == {"a": 2}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["file.json"]


def test_temp_files_of_an_interrupted_write_are_removed(tmp_path):
    d = Location.parse(tmp_path)
    (tmp_path / ".part-00001.parquet.0a1b.tmp").write_bytes(b"half a shard")
    (tmp_path / "part-00000.parquet").write_bytes(b"kept")
    assert d.remove_temp_files() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]
