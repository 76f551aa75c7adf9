"""Run directories on an S3-compatible store (moto on 127.0.0.1) through flagsim.storage.Location."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
from s3server import LocalS3, patched_environ, running_s3

from flagsim.errors import DataError
from flagsim.images import bundled_table, read_images_table, write_images_table
from flagsim.rundir import RunDir
from flagsim.shards import (
    Manifest,
    embeddings_table,
    iter_shards,
    read_embeddings,
    write_manifest,
    write_shard,
)
from flagsim.storage import Location, walk_files


@pytest.fixture(scope="module")
def s3_server() -> Iterator[LocalS3]:
    """A moto S3 server for this module; this process's env points pyarrow at it meanwhile."""
    with running_s3() as s3, patched_environ(s3.env):
        yield s3


@pytest.fixture
def s3_bucket(s3_server: LocalS3) -> str:
    """A fresh empty bucket per test."""
    return s3_server.new_bucket()


def test_s3_uri_goes_to_the_configured_endpoint(s3_server: LocalS3, s3_bucket: str) -> None:
    loc = Location.parse(f"s3://{s3_bucket}/run/hello.txt")
    assert not loc.is_local
    assert loc.uri == f"s3://{s3_bucket}/run/hello.txt"
    loc.write_text("hello")
    # boto3 talks to the server directly: the object really is there, under the key we expect
    assert s3_server.keys(s3_bucket) == ["run/hello.txt"]
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="run/hello.txt")["Body"].read()
    assert body == b"hello"
    assert loc.read_text() == "hello"


def test_parquet_json_and_bytes_round_trip(s3_bucket: str) -> None:
    root = Location.parse(f"s3://{s3_bucket}/r")
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    (root / "t.parquet").write_parquet(table)
    (root / "m.json").write_json({"rows": 3, "shards": {"p": 3}})
    (root / "raw.bin").write_bytes(bytes(range(256)))
    assert (root / "t.parquet").read_parquet().equals(table)
    assert (root / "t.parquet").parquet_num_rows() == 3
    assert (root / "t.parquet").read_parquet(columns=["b"]).column_names == ["b"]
    assert (root / "m.json").read_json() == {"rows": 3, "shards": {"p": 3}}
    assert (root / "raw.bin").read_bytes() == bytes(range(256))
    assert (root / "raw.bin").size() == 256


def test_list_dirs_exists_and_walk(s3_bucket: str) -> None:
    root = Location.parse(f"s3://{s3_bucket}/run")
    assert not root.exists()
    assert root.list() == []
    for name in ("b.parquet", "a.parquet", "notes.txt", ".hidden.parquet"):
        (root / "emb" / name).write_bytes(b"x")
    (root / "emb" / "model=pixels" / "part-00000.parquet").write_bytes(b"y")
    emb = root / "emb"
    assert emb.exists() and not emb.is_file()
    assert [loc.name for loc in emb.list(".parquet")] == ["a.parquet", "b.parquet"]
    assert [loc.name for loc in emb.list()] == ["a.parquet", "b.parquet", "notes.txt"]
    assert [d.name for d in emb.dirs()] == ["model=pixels"]
    walked = [loc.uri.removeprefix(root.uri + "/") for loc in walk_files(root)]
    assert walked == [
        "emb/.hidden.parquet", "emb/a.parquet", "emb/b.parquet",
        "emb/model=pixels/part-00000.parquet", "emb/notes.txt",
    ]


def test_overwrite_replaces_whole_object_and_leaves_no_temporaries(
    s3_server: LocalS3, s3_bucket: str
) -> None:
    loc = Location.parse(f"s3://{s3_bucket}/run/_manifest.json")
    loc.write_json({"version": 1, "pad": "x" * 100_000})
    loc.write_json({"version": 2})
    assert loc.read_json() == {"version": 2}
    # one object per written file: no temp/part objects stay behind on the store
    assert s3_server.keys(s3_bucket, "run/") == ["run/_manifest.json"]


def test_delete_file_and_directory(s3_server: LocalS3, s3_bucket: str) -> None:
    root = Location.parse(f"s3://{s3_bucket}/run")
    (root / "keep.txt").write_text("k")
    (root / "d" / "one.txt").write_text("1")
    (root / "d" / "sub" / "two.txt").write_text("2")
    (root / "keep.txt").delete()
    assert not (root / "keep.txt").exists()
    (root / "d").delete()
    assert not (root / "d").exists()
    assert s3_server.keys(s3_bucket) == []


def test_move_a_directory_tree_and_a_file(s3_server: LocalS3, s3_bucket: str) -> None:
    """`move_to` (what `embed --force` sets a model aside with): S3 moves objects one by one."""
    root = Location.parse(f"s3://{s3_bucket}/run")
    (root / "d" / "one.txt").write_text("1")
    (root / "d" / "sub" / "two.txt").write_text("2")
    (root / "f.txt").write_text("f")
    (root / "d").move_to(root / "_tmp" / "kept" / "d")
    (root / "f.txt").move_to(root / "_tmp" / "f.txt")
    assert not (root / "d").exists() and not (root / "f.txt").exists()
    assert (root / "_tmp" / "kept" / "d" / "sub" / "two.txt").read_text() == "2"
    assert (root / "_tmp" / "kept" / "d" / "one.txt").read_text() == "1"
    assert (root / "_tmp" / "f.txt").read_text() == "f"
    assert s3_server.keys(s3_bucket) == ["run/_tmp/f.txt", "run/_tmp/kept/d/one.txt",
                                         "run/_tmp/kept/d/sub/two.txt"]


def test_missing_object_is_a_data_error(s3_bucket: str) -> None:
    with pytest.raises(DataError, match="not a readable Parquet file"):
        Location.parse(f"s3://{s3_bucket}/nope.parquet").read_parquet()


def test_images_table_round_trip(s3_bucket: str) -> None:
    table = bundled_table().slice(0, 12)
    run = RunDir.at(f"s3://{s3_bucket}/runs/a")
    loc = write_images_table(table, run)
    assert loc.uri == f"s3://{s3_bucket}/runs/a/images.parquet"
    back = read_images_table(f"s3://{s3_bucket}/runs/a")
    assert back.column("image_id").to_pylist() == table.column("image_id").to_pylist()
    assert back.column("path").to_pylist() == table.column("path").to_pylist()


def test_shards_are_invisible_until_the_manifest_is_committed(s3_bucket: str) -> None:
    run = RunDir.at(f"s3://{s3_bucket}/runs/b")
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((7, 5)).astype(np.float32)
    ids = [f"img{i}" for i in range(7)]
    names = [f"Name {i}" for i in range(7)]
    write_shard(run, "pixels", 0, embeddings_table(ids[:4], names[:4], "pixels", vecs[:4]))
    write_shard(run, "pixels", 1, embeddings_table(ids[4:], names[4:], "pixels", vecs[4:]))
    with pytest.raises(DataError, match="incomplete"):
        list(iter_shards(run, "pixels"))
    write_manifest(
        run,
        Manifest(model="pixels", dim=5, rows=7, images_hash="h",
                 shards={"part-00000.parquet": 4, "part-00001.parquet": 3}),
    )
    got = read_embeddings(run, "pixels")
    assert got.ids == ids and got.names == names
    np.testing.assert_array_equal(got.vectors, vecs)
    assert run.embedded_models() == ["pixels"]


def _write_embeddings(run: RunDir, vecs: np.ndarray, shard: int = 5) -> None:
    n = len(vecs)
    ids = [f"img{i:03d}" for i in range(n)]
    shards = {}
    for j, start in enumerate(range(0, n, shard)):
        sl = slice(start, min(start + shard, n))
        loc = write_shard(run, "pixels", j, embeddings_table(ids[sl], [f"N{i}" for i in ids[sl]],
                                                             "pixels", vecs[sl]))
        shards[loc.name] = sl.stop - sl.start
    write_manifest(run, Manifest(model="pixels", dim=vecs.shape[1], rows=n, images_hash="h",
                                 shards=shards))


def test_index_and_neighbours_on_s3_equal_a_local_run(s3_server: LocalS3, s3_bucket: str,
                                                       tmp_path) -> None:
    from flagsim.config import Config
    from flagsim.search.build import build_index
    from flagsim.search.load import load_index
    from flagsim.search.neighbours import read_neighbours, write_neighbours

    vecs = np.random.default_rng(1).standard_normal((17, 8)).astype(np.float32)
    cfg = Config.model_validate({"neighbours": {"k": 4, "batch_size": 6}})
    results = {}
    for where in (str(tmp_path / "run"), f"s3://{s3_bucket}/runs/c"):
        run = RunDir.at(where)
        _write_embeddings(run, vecs)
        build_index(where, "pixels", cfg.index)
        if where.startswith("s3://"):
            # the neighbours job's workers must see the S3 endpoint: a process of its own whose
            # Ray starts inside this environment (the session's test Ray started before it)
            import os
            import subprocess
            import sys

            done = subprocess.run(
                [sys.executable, "-m", "flagsim.cli", "neighbours", "--run", where, "--models",
                 "pixels", "--set", "neighbours.k=4", "--set", "neighbours.batch_size=6"],
                env={**os.environ, **s3_server.env}, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            res = write_neighbours(where, models=["pixels"], cfg=cfg)[0]  # up to date: no Ray
            assert res.written == 0
        else:
            (res,) = write_neighbours(where, models=["pixels"], cfg=cfg)
        assert (res.queries, res.rows, res.parts) == (17, 17 * 4, 4)  # one part per shard
        results[where] = (load_index(where, "pixels", build=False), read_neighbours(where, "pixels"))
    (local_idx, local_nb), (s3_idx, s3_nb) = results.values()
    assert s3_idx.manifest.shards == local_idx.manifest.shards  # same bytes, same hashes
    assert list(s3_idx.ids) == list(local_idx.ids)
    assert s3_nb.equals(local_nb)
    keys = s3_server.keys(s3_bucket, "runs/c/")
    assert "runs/c/index/model=pixels/_manifest.json" in keys
    assert "runs/c/neighbours/model=pixels/part-00003.parquet" in keys
    assert "runs/c/_meta/neighbours/model=pixels/parts/part-00003.json" in keys
