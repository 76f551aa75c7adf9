"""flagsim search (the batch query job): new images embedded with the run's own models find
themselves first, an embeddings table gives what the neighbour table gives, reruns do nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flagsim.cli import main
from flagsim.errors import DataError
from flagsim.images import bundled_flags_dir
from flagsim.rundir import RunDir
from flagsim.search.batch import read_results, run_search
from flagsim.search.neighbours import read_neighbours
from flagsim.shards import read_embeddings, read_manifest

pytestmark = pytest.mark.usefixtures("ray_local")


def _run(path) -> RunDir:
    return RunDir.at(str(path))
MODELS = "pixels,colour-layout"  # weight-free: real models without a checkpoint to download


@pytest.fixture(scope="module")
def flag_run(tmp_path_factory):
    """A run of 40 bundled flags embedded with two models, with its neighbour tables; and a
    folder of 8 of those flags as new queries."""
    root = tmp_path_factory.mktemp("search")
    files = sorted(Path(bundled_flags_dir()).glob("**/*.png"))[:40]
    (root / "imgs").mkdir()
    (root / "new").mkdir()
    for f in files:
        shutil.copy(f, root / "imgs" / f.name)
    for f in files[::5]:
        shutil.copy(f, root / "new" / f.name)
    run = root / "run"
    assert main(["images", "--from-folder", str(root / "imgs"), "--out", str(run)]) == 0
    assert main(["embed", "--run", str(run), "--set", f"embed.models=[{MODELS}]"]) == 0
    assert main(["neighbours", "--run", str(run), "-k", "5"]) == 0
    assert main(["images", "--from-folder", str(root / "new"), "--out", str(root / "queries")]) == 0
    emb = read_embeddings(_run(run), "pixels")  # the pixels vectors as a plain Parquet table
    pq.write_table(pa.table({"image_id": emb.ids, "name": emb.names,
                             "embedding": pa.array(list(emb.vectors), pa.list_(pa.float32()))}),
                   root / "pixels.parquet")
    return root, run


def test_new_images_find_themselves_first_in_every_model_and_the_ensemble(flag_run, capsys) -> None:
    root, run = flag_run
    out = root / "out"
    assert main(["search", "--run", str(run), "--queries", str(root / "queries" / "images.parquet"),
                 "--out", str(out), "-k", "3"]) == 0
    assert "colour-layout" in capsys.readouterr().out
    dims = {m: read_manifest(_run(run), m).dim for m in ("pixels", "colour-layout")}
    dims["all"] = sum(dims.values())  # the ensemble concatenates its members
    for model in ("pixels", "colour-layout", "all"):
        t = read_results(str(out), model).to_pandas()
        assert t.query_id.nunique() == 8 and len(t) == 8 * 3
        first = t[t["rank"] == 1]
        assert (first.neighbour_id == first.query_id).all(), model
        # a float32 dot product of two unit d-vectors is exact to about d·2⁻²⁴ (4.5e-4 for the
        # ensemble's 7527 dimensions); CI's CPU measured 1.5e-5 off, so 1e-5 was too tight
        np.testing.assert_allclose(first.score, 1.0, atol=dims[model] * 2.0**-24)
    # the queries' embeddings are the run's own for the same images (same weights, same code)
    q, r = read_embeddings(_run(out), "pixels"), read_embeddings(_run(run), "pixels")
    pos = {i: p for p, i in enumerate(r.ids)}
    np.testing.assert_allclose(q.vectors, r.vectors[[pos[i] for i in q.ids]], atol=1e-6)
    # a rerun writes nothing and keeps the parts
    results = run_search(str(run), str(root / "queries" / "images.parquet"), str(out), k=3)
    assert [r.written for r in results] == [0, 0, 0]


def test_an_embeddings_table_gives_the_neighbour_table_with_the_query_kept(flag_run, monkeypatch
                                                                         ) -> None:
    root, run = flag_run
    out = root / "out-emb"
    results = run_search(str(run), str(root / "pixels.parquet"), str(out), models=["pixels"], k=6)
    assert [r.model for r in results] == ["pixels"] and results[0].queries == 40
    got = read_results(str(out), "pixels").to_pandas()
    want = read_neighbours(str(run), "pixels").to_pandas()
    for qid, rows in got.groupby("query_id"):
        rows = rows.sort_values("rank")
        assert rows.neighbour_id.iloc[0] == qid
        expected = want[want.query_id == qid].sort_values("rank")
        assert list(rows.neighbour_id.iloc[1:]) == list(expected.neighbour_id.iloc[:5])
        np.testing.assert_allclose(rows.score.iloc[1:], expected.score.iloc[:5], atol=1e-5)
    # another run as the queries: the same results for its images
    out2 = root / "out-run"
    run_search(str(run), str(run), str(out2), models=["pixels"], k=6)
    again = read_results(str(out2), "pixels").to_pandas().sort_values(["query_id", "rank"])
    assert list(again.neighbour_id) == list(got.sort_values(["query_id", "rank"]).neighbour_id)
    # OUT belongs to one search: other queries are refused (their results sat beside these,
    # read as one table, and _meta/search.json kept naming the first queries)
    with pytest.raises(DataError, match=r"holds the results of searching .*pixels\.parquet in "):
        run_search(str(run), str(root / "queries" / "images.parquet"), str(out), models=["pixels"],
                   k=6)
    assert read_results(str(out), "pixels").num_rows == len(got)
    # the same run and queries, spelled another way, resume (nothing written)
    monkeypatch.chdir(root)
    again = run_search("run", "pixels.parquet", str(out), models=["pixels"], k=6)
    assert [r.written for r in again] == [0]


def test_a_search_stopped_with_another_k_leaves_the_old_results_whole(flag_run, monkeypatch
                                                                      ) -> None:
    """A search again with another k writes its parts beside the results folder until all are
    written: stopped after one part, `pd.read_parquet(OUT/results)` reads the old table, not a
    mix of k (as an interrupted `flagsim neighbours`); the rerun resumes from the staged part."""
    import pandas as pd

    from flagsim.importemb import import_embeddings
    from flagsim.search.neighbours import PartWriter

    root, run = flag_run
    queries, out = root / "queries-4-shards", root / "out-k"
    import_embeddings(str(root / "pixels.parquet"), "pixels", str(queries), shard_size=10,
                      images=False)
    run_search(str(run), str(queries), str(out), models=["pixels"], k=3)
    write = PartWriter._write

    def stop_after_one(self, shard, table, n):
        if self.written:
            raise RuntimeError("stopped")
        write(self, shard, table, n)

    monkeypatch.setattr(PartWriter, "_write", stop_after_one)
    with pytest.raises(RuntimeError, match="stopped"):
        run_search(str(run), str(queries), str(out), models=["pixels"], k=5)
    df = pd.read_parquet(out / "results")
    assert len(df) == 40 * 3 and set(df.groupby("query_id")["rank"].max()) == {3}
    monkeypatch.setattr(PartWriter, "_write", write)
    results = run_search(str(run), str(queries), str(out), models=["pixels"], k=5)
    assert results[0].written == 3  # of 4 parts: the one staged before the stop is kept
    df = pd.read_parquet(out / "results")
    assert len(df) == 40 * 5 and set(df.groupby("query_id")["rank"].max()) == {5}
    assert not (out / "_tmp" / "results").exists()


def test_bad_search_requests_are_one_line(flag_run) -> None:
    root, run = flag_run
    with pytest.raises(DataError, match="must be a directory of its own"):
        run_search(str(run), str(run), str(run))
    with pytest.raises(DataError, match="name it with --models"):
        run_search(str(run), str(root / "pixels.parquet"), str(root / "o3"))
    with pytest.raises(DataError, match="queries not found"):
        run_search(str(run), str(root / "nope.parquet"), str(root / "o4"))
    # refused queries (a typo) leave no mark tying OUT to them: the corrected rerun is not refused
    assert not (root / "o4").exists()
    # k beyond the collection is refused before the queries are embedded (nothing in OUT)
    with pytest.raises(DataError, match="k=500 is larger than the collection: model pixels"):
        run_search(str(run), str(root / "queries" / "images.parquet"), str(root / "o5"), k=500)
    assert not (root / "o5").exists()
    # OUT is a folder of its own: never the run through a link, inside it, or other work
    (root / "link").symlink_to(run)
    for out in (root / "link", run / "embeddings", root):
        with pytest.raises(DataError, match="must be a directory of its own"):
            run_search(str(run), str(root / "queries" / "images.parquet"), str(out), k=3)
    other = root / "other-work"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="already holds other files and is not the output of a "
                                        "flagsim search"):
        run_search(str(run), str(root / "queries" / "images.parquet"), str(other), k=3)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert read_manifest(_run(run), "pixels").rows == 40  # the run as it was
    (root / "garbage.parquet").write_bytes(b"PAR1x")
    with pytest.raises(DataError, match="garbage.parquet is not a readable Parquet file"):
        run_search(str(run), str(root / "garbage.parquet"), str(root / "o6"), models=["pixels"])
