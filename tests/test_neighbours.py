"""The batch neighbour table: equal to brute force, one part per shard, and the original
experiment reproduced (through the neighbours Ray Data job)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import runs

from flagsim.cli import main
from flagsim.config import load_config
from flagsim.images import safe_stem
from flagsim.importcsv import model_from_label
from flagsim.rundir import RunDir
from flagsim.schema import NEIGHBOURS_SCHEMA
from flagsim.search.neighbours import read_neighbours, write_neighbours

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def make_run(root, model: str, vectors: np.ndarray, shard_size: int = 100) -> RunDir:
    """runs.make_run with four-digit ids (img0000, …), as this file's assertions spell them."""
    return runs.make_run(root, model, vectors, shard_size, ids=[f"img{i:04d}" for i in range(len(vectors))])


def test_neighbour_table_equals_brute_force_one_part_per_query_shard(tmp_path, ray_local) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(103, 16)).astype(np.float32)
    b = rng.normal(size=(103, 10)).astype(np.float32)
    make_run(tmp_path, "a", a, shard_size=40)
    make_run(tmp_path, "b", b, shard_size=40)
    cfg = load_config(None, ["neighbours.batch_size=25"])
    results = write_neighbours(str(tmp_path), k=6, cfg=cfg)
    assert [r.model for r in results] == ["a", "b", "all"]  # the ensemble beside the models
    for model, vectors in (("a", a), ("b", b)):
        files = RunDir.at(str(tmp_path)).neighbours_dir(model).list(".parquet")
        assert [f.name for f in files] == [f"part-{i:05d}.parquet" for i in range(3)]
        assert [pq.read_table(f.path).num_rows for f in files] == [40 * 6, 40 * 6, 23 * 6]
        table = read_neighbours(str(tmp_path), model)
        assert table.schema.equals(NEIGHBOURS_SCHEMA)
        df = table.to_pandas()
        assert len(df) == 103 * 6
        assert set(df["model"]) == {model}
        assert (df["query_id"] != df["neighbour_id"]).all()
        x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        sims = x.astype(np.float64) @ x.T.astype(np.float64)
        np.fill_diagonal(sims, -np.inf)
        order = np.argsort(-sims, axis=1)[:, :6]
        for qi in range(103):
            got = df[df["query_id"] == f"img{qi:04d}"].sort_values("rank")
            assert got["rank"].tolist() == [1, 2, 3, 4, 5, 6]
            assert got["neighbour_id"].tolist() == [f"img{j:04d}" for j in order[qi]]
            np.testing.assert_allclose(got["score"], sims[qi, order[qi]], atol=1e-5)
            assert got["query"].iloc[0] == f"Image img{qi:04d}"


def test_new_k_rewrites_every_part_and_fewer_shards_leave_no_stale_parts(tmp_path, ray_local) -> None:
    x = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    make_run(tmp_path, "a", x, shard_size=7)
    run = RunDir.at(str(tmp_path))
    (first,) = write_neighbours(str(tmp_path), k=3, models=["a"])
    assert (first.parts, first.written) == (5, 5)
    (again,) = write_neighbours(str(tmp_path), k=2, models=["a"])  # another k: every part redone
    assert (again.parts, again.written, again.rows) == (5, 5, 30 * 2)
    for sub in (run.model_dir("a"), run.meta_dir("a")):
        shutil.rmtree(sub.path)
    make_run(tmp_path, "a", x, shard_size=100)  # the same images in one shard
    (last,) = write_neighbours(str(tmp_path), k=2, models=["a"])
    assert (last.parts, last.written) == (1, 1)
    assert [f.name for f in run.neighbours_dir("a").list(".parquet")] == ["part-00000.parquet"]
    markers = run.neighbours_manifest("a").parent / "parts"
    assert [f.name for f in markers.list(".json")] == ["part-00000.json"]
    assert read_neighbours(str(tmp_path), "a").num_rows == 30 * 2


def test_an_interrupted_rewrite_leaves_the_old_table_whole_and_the_rerun_publishes_the_new(
    tmp_path, ray_local, monkeypatch
) -> None:
    """`neighbours -k 7` over a k=5 table wrote its parts into the table folder one by one: killed
    halfway, `pd.read_parquet(RUN/neighbours)` read 9 parts of k=5 and 6 of k=7 as one table. New
    parts are now staged in `_tmp/neighbours/` and moved in when all are written."""
    import flagsim.search.neighbours as nb

    x = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    make_run(tmp_path, "a", x, shard_size=7)
    run = RunDir.at(str(tmp_path))
    write_neighbours(str(tmp_path), k=3, models=["a"])
    old = pd.read_parquet(run.neighbours.path)

    real_write, calls = nb.PartWriter._write, []

    def killed_after_two_parts(self, shard, table, queries):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill: the job stops between two parts
        calls.append(shard)
        real_write(self, shard, table, queries)

    monkeypatch.setattr(nb.PartWriter, "_write", killed_after_two_parts)
    with pytest.raises(KeyboardInterrupt):
        write_neighbours(str(tmp_path), k=4, models=["a"])
    monkeypatch.undo()
    during = pd.read_parquet(run.neighbours.path)  # what another tool reads meanwhile
    assert during.groupby("query_id")["rank"].max().eq(3).all()  # the old table, whole
    pd.testing.assert_frame_equal(during, old)
    assert len(nb.staged_parts(run, "a").list(".parquet")) == 2

    (again,) = write_neighbours(str(tmp_path), k=4, models=["a"])  # resumes: 3 parts searched
    assert (again.parts, again.written, again.rows) == (5, 5, 30 * 4)
    after = pd.read_parquet(run.neighbours.path)
    assert after.groupby("query_id")["rank"].max().eq(4).all() and len(after) == 30 * 4
    assert not nb.staged_parts(run, "a").parent.exists()  # no empty staging folder left


def test_a_staged_part_without_its_marker_is_never_published(tmp_path, ray_local) -> None:
    """Review: a rewrite stopped between a staged part and its marker, then a rerun with the old
    k (every part done by its old marker) moved the staged part of the other k into the table."""
    import flagsim.search.neighbours as nb

    x = np.random.default_rng(3).normal(size=(30, 4)).astype(np.float32)
    make_run(tmp_path, "a", x, shard_size=7)
    run = RunDir.at(str(tmp_path))
    write_neighbours(str(tmp_path), k=3, models=["a"])
    before = pd.read_parquet(run.neighbours.path)
    stray = nb.staged_parts(run, "a") / "part-00000.parquet"
    stray.write_bytes(b"a part of another k, its marker never written")
    (again,) = write_neighbours(str(tmp_path), k=3, models=["a"])
    assert again.written == 0
    pd.testing.assert_frame_equal(pd.read_parquet(run.neighbours.path), before)
    assert not nb.staged_parts(run, "a").exists()


def test_k_larger_than_the_collection_is_a_one_line_error(tmp_path, capsys) -> None:
    make_run(tmp_path, "a", np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32))
    assert main(["-q", "neighbours", "--run", str(tmp_path), "-k", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("flagsim: error: k=8 is larger than the collection: model a has 8 images, "
                   "so at most 7 neighbours each")
    assert not RunDir.at(str(tmp_path)).neighbours_dir("a").exists()
    assert not RunDir.at(str(tmp_path)).index_path("a").exists()


@pytest.mark.parametrize("command", [["neighbours"], ["dedup", "--threshold", "0.99"], ["report"]])
def test_a_one_image_run_says_it_has_no_neighbours_not_a_k_the_user_never_chose(
        tmp_path, capsys, command) -> None:
    """Before: `dedup` and `report` of a one-image run said 'k=10 is larger than the collection'
    (the config's neighbours.k); the run has no neighbours at any k."""
    make_run(tmp_path, "a", np.ones((1, 4), dtype=np.float32))
    assert main(["-q", *command, "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("flagsim: error: model a has 1 image: no neighbours to find "
                   "(at least 2 needed)")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The original experiment's six embedding files imported into one run."""
    root = tmp_path_factory.mktemp("reference")
    files = sorted(str(p) for p in REFERENCE.glob("national_flag_embeddings_*.csv.gz"))
    assert len(files) == 6
    assert main(["-q", "import-csv", *files, "--run", str(root)]) == 0
    return root


def test_reference_import_and_neighbours_reproduce_the_original_top5(reference_run, ray_local,
                                                                     capsys) -> None:
    assert main(["-q", "neighbours", "--run", str(reference_run), "-k", "5"]) == 0
    capsys.readouterr()
    original = pd.read_csv(REFERENCE / "original_top5_cosine.csv.gz")
    original["model"] = original["model"].map(model_from_label)
    assert sorted(original["model"].unique()) == sorted(
        ["vit", "clip", "blip2", "dinov2", "efficientnet", "vgg16"]
    )
    original["query_id"] = original["Country"].map(safe_stem)
    original["want_id"] = original["neighbor"].map(safe_stem)
    checked = 0
    for model, want in original.groupby("model"):
        got = read_neighbours(str(reference_run), model).to_pandas()
        assert len(got) == len(want) == 195 * 5
        both = want.merge(got, on=["query_id", "rank"], how="left", validate="one_to_one")
        assert both["neighbour_id"].notna().all()
        np.testing.assert_allclose(both["score"], both["cosine"], atol=1e-5)
        for _, row in both[both["neighbour_id"] != both["want_id"]].iterrows():
            # only an exact tie may swap places: another of the original's top 5 for this
            # country must have the same cosine
            same = want[(want["query_id"] == row["query_id"]) & (want["rank"] != row["rank"])]
            assert (abs(same["cosine"] - row["cosine"]) < 1e-5).any(), (model, row["Country"])
        checked += len(both)
    assert checked == 6 * 195 * 5
    ensemble = read_neighbours(str(reference_run), "all").to_pandas()  # mean cosine over the six
    assert len(ensemble) == 195 * 5 and (ensemble["query_id"] != ensemble["neighbour_id"]).all()
