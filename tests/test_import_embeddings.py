"""`flagsim import-embeddings`: Parquet tables and clip-retrieval output become validated shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from flagsim import cli, importemb
from flagsim.errors import DataError
from flagsim.importemb import _npy_info, _npy_rows, import_embeddings
from flagsim.rundir import RunDir
from flagsim.runlock import RunLockedError, run_lock
from flagsim.search.neighbours import read_neighbours, write_neighbours
from flagsim.shards import read_embeddings, read_manifest
from flagsim.storage import Location

DIM = 8


@pytest.fixture()
def cli_main():
    """flagsim.cli.main, where `import-embeddings` is a registered command."""
    assert "import-embeddings" in cli.COMMANDS
    return cli.main


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Read 3 rows at a time, so batches, files and shards (size 4) all have different bounds."""
    monkeypatch.setattr(importemb, "BATCH_ROWS", 3)


def _vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _clip_folder(root: Path, parts: list[tuple[list[str], np.ndarray]],
                 meta_rows: list[int] | None = None) -> Path:
    """clip-retrieval's layout: embeddings/img_emb/img_emb_i.npy + embeddings/metadata/metadata_i.parquet."""
    (root / "embeddings" / "img_emb").mkdir(parents=True)
    (root / "embeddings" / "metadata").mkdir()
    for i, (keys, vecs) in enumerate(parts):
        np.save(root / "embeddings" / "img_emb" / f"img_emb_{i}.npy", vecs)
        keys = keys[: meta_rows[i]] if meta_rows else keys
        meta = pa.table({
            "image_path": [f"/data/images/{k}.jpg" for k in keys],
            "caption": [f"a photo of {k}" for k in keys],
            "key": keys,
        })
        pq.write_table(meta, root / "embeddings" / "metadata" / f"metadata_{i}.parquet")
    return root


def _keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    err = [ln for ln in lines if ln.startswith("flagsim: error:")]
    assert len(err) == 1, lines
    assert lines[-1] == err[0] and "Traceback" not in "".join(lines)
    return err[0]


def _brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of every row, itself excluded: (positions, scores)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_clip_retrieval_folder_round_trips_and_neighbours_match_numpy(tmp_path, capsys, cli_main):
    a, b = _vectors(7, seed=1), _vectors(5, seed=2)
    keys = _keys("a", 7) + _keys("b", 5)
    src = _clip_folder(tmp_path / "out", [(keys[:7], a), (keys[7:], b)])
    run_dir = tmp_path / "run"
    rc = cli_main(["import-embeddings", str(src), "--model", "openclip", "--run", str(run_dir),
                   "--shard-size", "4"])
    assert rc == 0
    assert "12 x 8 embeddings of openclip from 2 clip-retrieval file(s)" in capsys.readouterr().out
    run = RunDir.at(str(run_dir))
    emb = read_embeddings(run, "openclip")
    want = np.concatenate([a, b])
    assert emb.ids == keys  # default id column: `key`, the first of key, image_path, url
    assert emb.names == [f"a photo of {k}" for k in keys]
    np.testing.assert_array_equal(emb.vectors, want)
    assert emb.manifest.shards == {"part-00000.parquet": 4, "part-00001.parquet": 4,
                                   "part-00002.parquet": 4}
    assert (emb.manifest.rows, emb.manifest.dim, emb.manifest.shard_size) == (12, 8, 4)
    assert emb.manifest.source == "flagsim import-embeddings out"
    assert not (run_dir / "_tmp").exists() or not any((run_dir / "_tmp").iterdir())

    k = 3
    write_neighbours(str(run_dir), k=k, models=["openclip"])
    table = read_neighbours(str(run_dir), "openclip").to_pydict()
    pos, scores = _brute_force(want.astype(np.float64), k)
    assert table["query_id"] == [q for q in keys for _ in range(k)]
    assert table["rank"] == [1, 2, 3] * len(keys)
    assert table["neighbour_id"] == [keys[j] for row in pos for j in row]
    np.testing.assert_allclose(table["score"], scores.reshape(-1), atol=1e-5)


def test_clip_retrieval_id_column_option_and_float16(tmp_path):
    vecs = _vectors(5).astype(np.float16)
    src = _clip_folder(tmp_path / "out", [(_keys("x", 5), vecs)])
    res = import_embeddings(str(src / "embeddings"), "half", str(tmp_path / "run"),
                            id_column="image_path", name_column="key", shard_size=2)
    assert (res.rows, res.dim, res.shards, res.format) == (5, DIM, 3, "clip-retrieval")
    emb = read_embeddings(RunDir.at(str(tmp_path / "run")), "half")
    assert emb.ids == [f"/data/images/x{i:04d}.jpg" for i in range(5)]
    assert emb.names == _keys("x", 5)
    np.testing.assert_array_equal(emb.vectors, vecs.astype(np.float32))


def test_parquet_file_with_list_column(tmp_path):
    vecs = _vectors(6).astype(np.float64)
    ids = ["Chad", "Romania", "Japan", "Palau", "Italy", "Ireland"]
    names = ["Chad", "Romania", None, "Palau", "Italy", "Ireland"]  # a null name falls back to the id
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"image_id": ids, "name": names, "embedding": [list(v) for v in vecs],
                             "extra": list(range(6))}), path, row_group_size=2)
    res = import_embeddings(str(path), "mymodel", str(tmp_path / "run"), shard_size=4)
    assert (res.rows, res.dim, res.shards, res.format, res.files) == (6, DIM, 2, "parquet", 1)
    emb = read_embeddings(RunDir.at(str(tmp_path / "run")), "mymodel")
    assert emb.ids == ids
    assert emb.names == ["Chad", "Romania", "Japan", "Palau", "Italy", "Ireland"]
    np.testing.assert_array_equal(emb.vectors, vecs.astype(np.float32))
    # every id is a bundled flag: the run gets the bundled flags' images table, as import-csv does
    assert res.images_table == "written"


def test_parquet_folder_with_fixed_size_list_column(tmp_path):
    folder = tmp_path / "tbl"
    (folder / "day=2").mkdir(parents=True)
    parts = [(folder / "a.parquet", _keys("p", 4), _vectors(4, seed=3)),
             (folder / "day=2" / "b.parquet", _keys("q", 3), _vectors(3, seed=4))]
    for path, ids, vecs in parts:
        col = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), DIM)
        pq.write_table(pa.table({"uid": ids, "vec": col}), path)
    (folder / "_SUCCESS").write_text("")
    (folder / "_common_metadata.parquet").write_bytes(b"not data")  # `_` files are skipped
    res = import_embeddings(str(folder), "fixed", str(tmp_path / "run"), id_column="uid",
                            vector_column="vec")
    assert (res.rows, res.files, res.shards) == (7, 2, 1)
    emb = read_embeddings(RunDir.at(str(tmp_path / "run")), "fixed")
    assert emb.ids == parts[0][1] + parts[1][1]
    assert emb.names == emb.ids  # no name column: the id
    np.testing.assert_array_equal(emb.vectors, np.concatenate([parts[0][2], parts[1][2]]))


def _list_table(ids: list[str], vecs: list[list[float]]) -> pa.Table:
    return pa.table({"image_id": ids, "embedding": pa.array(vecs, pa.list_(pa.float32()))})


def _bad_input(kind: str, root: Path) -> tuple[list[str], str]:
    """(extra arguments, expected error text) of one bad input written under `root`."""
    good = _vectors(6, seed=5)
    if kind == "dim":  # second file 6-d
        _clip_folder(root, [(_keys("a", 6), good), (_keys("b", 3), _vectors(3, 6))])
        return [], "img_emb_1.npy: row 0 (id 'b0000'): 6 values, but"
    if kind == "nan":
        bad = good.copy()
        bad[4, 2] = np.nan
        pq.write_table(_list_table(_keys("a", 6), bad.tolist()), root / "t.parquet")
        return [], "t.parquet: row 4 (id 'a0004'): embedding holds NaN or Inf"
    if kind == "inf-in-npy":
        bad = _vectors(3, seed=6)
        bad[1, 0] = np.inf
        _clip_folder(root, [(_keys("a", 6), good), (_keys("b", 3), bad)])
        return [], "img_emb_1.npy: row 1 (id 'b0001'): embedding holds NaN or Inf"
    if kind == "ragged":
        rows = good.tolist()
        rows[5] = rows[5][:-1]
        pq.write_table(_list_table(_keys("a", 6), rows), root / "t.parquet")
        return [], "t.parquet: row 5 (id 'a0005'): 7 values, but"
    if kind == "duplicate":
        _clip_folder(root, [(_keys("a", 6), good), (["b0", "a0003", "b2"], _vectors(3, seed=7))])
        return [], "metadata_1.parquet: row 1: duplicate id 'a0003' (also"
    if kind == "no-id-column":
        pq.write_table(pa.table({"id": _keys("a", 6), "embedding": good.tolist()}), root / "t.parquet")
        return [], "t.parquet has no column 'image_id' (columns: id, embedding); pass --id-column"
    if kind == "row-mismatch":
        _clip_folder(root, [(_keys("a", 6), good), (_keys("b", 3), _vectors(3))], meta_rows=[6, 2])
        return [], "metadata_1.parquet has 2 rows but"
    if kind == "missing-metadata":
        _clip_folder(root, [(_keys("a", 6), good), (_keys("b", 3), _vectors(3))])
        (root / "embeddings" / "metadata" / "metadata_1.parquet").unlink()
        return [], "img_emb_1.npy has no metadata file"
    if kind == "registered-dim":
        pq.write_table(_list_table(_keys("a", 6), good.tolist()), root / "t.parquet")
        return ["--model", "clip"], "t.parquet: 8-d embeddings, but model clip is 512-d"
    if kind == "empty":
        pq.write_table(_list_table([], []), root / "t.parquet")
        return [], "t.parquet holds no rows"
    if kind == "null-id":
        pq.write_table(pa.table({"image_id": ["a", None, "c"],
                                 "embedding": _vectors(3).tolist()}), root / "t.parquet")
        return [], "t.parquet: row 1: null id in column 'image_id'"
    if kind == "not-floats":
        pq.write_table(pa.table({"image_id": ["a"], "embedding": ["1,2,3"]}), root / "t.parquet")
        return [], "t.parquet: column 'embedding' is string, not a list of floats"
    if kind == "corrupt-parquet":
        pq.write_table(_list_table(_keys("a", 6), good.tolist()), root / "a.parquet")
        (root / "b.parquet").write_bytes(b"PAR1 truncated")
        return [], "b.parquet is not a readable Parquet file"
    if kind == "int-npy":
        _clip_folder(root, [(_keys("a", 6), good), (_keys("b", 3), np.ones((3, DIM), np.int64))])
        return [], "img_emb_1.npy holds int64 values, not floats"
    raise AssertionError(kind)


BAD = ["dim", "nan", "inf-in-npy", "ragged", "duplicate", "no-id-column", "row-mismatch",
       "missing-metadata", "registered-dim", "empty", "null-id", "not-floats", "corrupt-parquet",
       "int-npy"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_and_leaves_the_run_as_it_was(tmp_path, capsys, cli_main, kind):
    run_dir = tmp_path / "run"
    model = "clip" if kind == "registered-dim" else "mine"
    old = _vectors(10, dim=512 if model == "clip" else DIM, seed=9)
    pq.write_table(_list_table(_keys("old", 10), old.tolist()), tmp_path / "old.parquet")
    assert cli_main(["import-embeddings", str(tmp_path / "old.parquet"), "--model", model,
                     "--run", str(run_dir), "--shard-size", "4"]) == 0
    before = _snapshot(run_dir)
    assert any(name.startswith("embeddings/") for name in before)
    src = tmp_path / "src"
    src.mkdir()
    extra, expected = _bad_input(kind, src)
    target = str(src / "t.parquet") if (src / "t.parquet").exists() else str(src)
    argv = ["import-embeddings", target, "--model", model, "--run", str(run_dir), "--force",
            "--shard-size", "2", *extra]  # small shards: some are staged before the bad row
    capsys.readouterr()
    assert cli_main(argv) == 2
    assert expected in _one_line_error(capsys)
    assert _snapshot(run_dir) == before
    np.testing.assert_array_equal(read_embeddings(RunDir.at(str(run_dir)), model).vectors, old)


def test_bad_input_into_a_new_run_creates_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _bad_input("dim", src)
    with pytest.raises(DataError, match="6 values"):
        import_embeddings(str(src), "mine", str(tmp_path / "run"), shard_size=2)
    assert not (tmp_path / "run").exists()


def test_reimport_refuses_without_force_and_replaces_with_it(tmp_path, capsys, cli_main):
    run_dir = tmp_path / "run"
    first = _clip_folder(tmp_path / "first", [(_keys("a", 7), _vectors(7, seed=1)),
                                              (_keys("b", 5), _vectors(5, seed=2))])
    argv = ["--model", "m", "--run", str(run_dir), "--shard-size", "4"]
    assert cli_main(["import-embeddings", str(first), *argv]) == 0
    before = _snapshot(run_dir)
    second_vecs = _vectors(3, seed=8)
    pq.write_table(_list_table(["x", "y", "z"], second_vecs.tolist()), tmp_path / "second.parquet")
    capsys.readouterr()
    assert cli_main(["import-embeddings", str(tmp_path / "second.parquet"), *argv]) == 2
    assert "already holds embeddings of m; pass --force to replace them" in _one_line_error(capsys)
    assert _snapshot(run_dir) == before

    assert cli_main(["import-embeddings", str(tmp_path / "second.parquet"), *argv, "--force"]) == 0
    run = RunDir.at(str(run_dir))
    emb = read_embeddings(run, "m")
    assert emb.ids == ["x", "y", "z"]
    np.testing.assert_array_equal(emb.vectors, second_vecs)
    # the old import's three shards and their markers are gone, not just overwritten
    assert sorted(p.name for p in (run_dir / "embeddings" / "model=m").iterdir()) == ["part-00000.parquet"]
    markers = run_dir / "_meta" / "embeddings" / "model=m" / "shards"
    assert sorted(p.name for p in markers.iterdir()) == ["part-00000.json"]
    manifest = read_manifest(run, "m")
    assert manifest is not None and manifest.source == "flagsim import-embeddings second.parquet"
    assert manifest.run_id == emb.manifest.run_id and before["_meta/run.json"] == (
        run_dir / "_meta" / "run.json").read_bytes()  # the run keeps its id


def test_rerunning_the_same_import_is_up_to_date_and_a_changed_input_is_refused(
    tmp_path, capsys, cli_main
) -> None:
    """A retry of a finished import (a kill that came after the commit, a rerun loop) failed
    with "already holds embeddings; pass --force". The same files (path, size, modification
    time) and options are now up to date, nothing written; other files or options still need --force."""
    import os

    run_dir = tmp_path / "run"
    src = _clip_folder(tmp_path / "clip", [(_keys("a", 7), _vectors(7, seed=1))])
    argv = ["--model", "m", "--run", str(run_dir), "--shard-size", "4"]
    assert cli_main(["import-embeddings", str(src), *argv]) == 0
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert cli_main(["import-embeddings", str(src), *argv]) == 0
    assert "up to date (the same 1 file(s) already imported)" in capsys.readouterr().out
    assert _snapshot(run_dir) == before
    assert cli_main(["import-embeddings", str(src), *argv[:-1], "5"]) == 2  # another shard size
    assert "pass --force" in _one_line_error(capsys)
    npy = src / "embeddings" / "img_emb" / "img_emb_0.npy"
    os.utime(npy, ns=(npy.stat().st_atime_ns, npy.stat().st_mtime_ns + 10**9))  # rewritten
    assert cli_main(["import-embeddings", str(src), *argv]) == 2
    assert "pass --force" in _one_line_error(capsys)
    assert _snapshot(run_dir) == before


def test_import_waits_for_no_one_when_the_run_is_locked(tmp_path):
    pq.write_table(_list_table(["a", "b"], _vectors(2).tolist()), tmp_path / "t.parquet")
    run = RunDir.at(str(tmp_path / "run"))
    with run_lock(run.root, "flagsim embed"), pytest.raises(RunLockedError, match="flagsim embed"):
        import_embeddings(str(tmp_path / "t.parquet"), "m", str(tmp_path / "run"))
    assert not run.model_dir("m").exists()


def test_npy_rows_stream_from_a_non_local_filesystem(tmp_path):
    """Object stores cannot be memory-mapped: the header is parsed and rows streamed in batches."""
    vecs = _vectors(7).astype(np.float16)
    np.save(tmp_path / "e.npy", vecs)
    np.save(tmp_path / "f.npy", np.asfortranarray(_vectors(7)))
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    loc = Location(fs, "e.npy", "sub://e.npy")
    assert not loc.is_local
    info = _npy_info(loc)
    assert (info.shape, info.dtype) == ((7, DIM), np.dtype(np.float16))
    chunks = list(_npy_rows(loc, info))
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), vecs)
    floc = Location(fs, "f.npy", "sub://f.npy")
    with pytest.raises(DataError, match="Fortran-order"):
        list(_npy_rows(floc, _npy_info(floc)))


def test_an_import_killed_midway_leaves_nothing_the_next_import_keeps(tmp_path, capsys, cli_main):
    """SIGKILL while shards are staged: the run is unchanged, and the next import under the
    run's lock removes the dead import's staging folder (it used to stay, a whole model's
    shards in `_tmp/`)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "emb.parquet"
    ids = _keys("x", 20)
    pq.write_table(pa.table({"image_id": ids, "embedding": list(_vectors(20))}), src)
    run_dir = tmp_path / "run"
    held = tmp_path / "held"
    # a child that stages two shards, then waits forever in its third (until killed)
    script = f"""
import time
import json
from pathlib import Path
from flagsim import cli, importemb
importemb.BATCH_ROWS = 3
add = importemb._Sink.add
def slow_add(self, chunk):
    if self.rows >= 8:
        Path({str(held)!r}).touch()
        time.sleep(600)
    add(self, chunk)
importemb._Sink.add = slow_add
cli.main(["import-embeddings", {str(src)!r}, "--model", "ext", "--run", {str(run_dir)!r},
          "--shard-size", "4"])
"""
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not held.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        staged = [p for p in (run_dir / "_tmp").iterdir() if p.name.startswith("import-")]
        assert len(staged) == 1 and list(staged[0].rglob("part-*.parquet"))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not (run_dir / "embeddings").exists()  # nothing committed
    keep = run_dir / "_tmp" / "import-notes"  # not a staging folder's name: left alone
    keep.mkdir()
    assert cli_main(["import-embeddings", str(src), "--model", "ext", "--run", str(run_dir),
                     "--shard-size", "4"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (run_dir / "_tmp").iterdir()) == ["import-notes"]
    assert read_embeddings(RunDir.at(str(run_dir)), "ext").ids == ids


def test_extreme_but_finite_float32_magnitudes_score_their_exact_cosines_both_ways(
        tmp_path, capsys, cli_main):
    """3e38 (valid float32, but its float32 norm overflowed: the row became a zero vector scoring
    0 to everything) and 1e-45 (denormal: one->sub scored 0.942809 but sub->one 1.0) are unit
    vectors like any other: query and neighbours scores are the float64 cosines, symmetric."""
    rows = {"big": [3e38] * DIM, "one": [1.0] * DIM, "neg": [-1.0] * DIM, "sub": [1e-45] * DIM}
    ids = list(rows)
    pq.write_table(pa.table({"image_id": ids, "name": ids,
                             "embedding": pa.array(list(rows.values()), pa.list_(pa.float32()))}),
                   tmp_path / "t.parquet")
    run_dir = str(tmp_path / "run")
    assert cli_main(["import-embeddings", str(tmp_path / "t.parquet"), "--model", "m",
                     "--run", run_dir]) == 0
    vec = np.array(list(rows.values()), np.float32).astype(np.float64)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    want = {(a, b): float(unit[i] @ unit[j]) for i, a in enumerate(ids) for j, b in enumerate(ids)}
    capsys.readouterr()
    got = {}
    for q in ids:
        assert cli_main(["-q", "query", q, "--run", run_dir, "-k", "3", "--json"]) == 0
        out = capsys.readouterr()
        assert "zero vector" not in out.err
        for hit in json.loads(out.out)["results"]["m"]:
            got[(q, hit["image_id"])] = hit["score"]
    assert set(got) == {p for p in want if p[0] != p[1]}
    for (a, b), score in got.items():
        assert score == pytest.approx(want[(a, b)], abs=1e-5), (a, b)
        assert score == pytest.approx(got[(b, a)], abs=1e-6), (a, b)
    write_neighbours(run_dir, k=3, models=["m"])
    table = read_neighbours(run_dir, "m").to_pydict()
    pairs = {(q, n): s for q, n, s in zip(table["query_id"], table["neighbour_id"], table["score"],
                                          strict=True)}
    assert set(pairs) == set(got)
    for pair, score in pairs.items():
        assert score == pytest.approx(want[pair], abs=1e-5), pair
