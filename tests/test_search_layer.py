"""The search layer (flagsim/search/): parted indexes merge exactly, the ensemble index, the run
session reads only what a query needs, memory-mapped loads, and the GPU k limit falls back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runs import make_run

from flagsim.config import IndexConfig
from flagsim.errors import ConfigError, DataError
from flagsim.search.backend import GPU_MAX_K, FaissIndex, VectorIndex, merge_topk
from flagsim.search.build import build_index
from flagsim.search.catalog import ENSEMBLE
from flagsim.search.load import load_index
from flagsim.search.saved import index_state
from flagsim.search.session import RunSearch
from flagsim.search.vectors import ensemble_vectors, normalise


def brute(x: np.ndarray, k: int, q: np.ndarray | None = None, exclude_self: bool = True):
    x = normalise(x)
    q = x if q is None else normalise(q)
    sims = q @ x.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def tiny_budget(nbytes: int, **kw) -> IndexConfig:
    """A memory budget that leaves about `nbytes` per part for the index data."""
    return IndexConfig(memory_budget_gb=nbytes / 1024**3, **kw)


def test_an_index_over_the_budget_is_built_in_parts_that_give_exact_results(tmp_path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(900, 16)).astype(np.float32)
    run = make_run(tmp_path, "m", x, shard_size=128)
    # the build's own overhead (one shard + recall sample) is ~ (900+900) x 16 x 4 bytes
    cfg = tiny_budget((900 + 900) * 16 * 4 + 900 * 16 * 4 // 4, kind="flat")
    idx = build_index(run, "m", cfg)
    parts = idx.manifest.parts
    assert len(parts) >= 3, parts
    assert [p["offset"] for p in parts] == sorted(p["offset"] for p in parts)
    assert sum(p["count"] for p in parts) == 900
    files = sorted(p.name for p in run.index_path("m").list(".faiss"))
    assert files == [p["file"] for p in parts] and "index.faiss" not in files
    loaded = load_index(run, "m", cfg, build=False, verify=True)
    ids = [f"img{i:05d}" for i in range(900)]
    scores, pos = loaded.search(x, 9, exclude=ids)
    want_s, want_p = brute(x, 9)
    np.testing.assert_array_equal(pos, want_p)
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    # rebuilt as one part: the part files go, index.faiss comes
    build_index(run, "m", IndexConfig(kind="flat"))
    assert sorted(p.name for p in run.index_path("m").list(".faiss")) == ["index.faiss"]
    assert index_state(run, "m", verify=True)[0] == "fresh"


def test_ivf_parts_share_one_quantiser_and_record_recall(tmp_path) -> None:
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float32)
    run = make_run(tmp_path, "m", x, shard_size=500)
    cfg = tiny_budget(3000 * 32 * 4 // 2 + (3000 + 1000 + 1280) * 32 * 4, kind="ivf", nlist=20,
                      nprobe=20, recall_sample=200)
    idx = build_index(run, "m", cfg)
    assert len(idx.manifest.parts) >= 2
    assert idx.manifest.recall == pytest.approx(1.0)  # every list probed: exact
    scores, pos = load_index(run, "m", cfg, build=False).search(x[:50], 5)
    want_s, want_p = brute(x, 5, x[:50], exclude_self=False)
    np.testing.assert_allclose(scores, want_s, atol=1e-4)
    assert (pos == want_p).mean() > 0.99  # ties aside, the same neighbours


def test_an_ivf_build_reads_each_shard_once_when_its_rows_fit_the_budget(tmp_path, monkeypatch
                                                                         ) -> None:
    from flagsim.search import source
    from flagsim.search.choice import build_peak_bytes, held_vectors_bytes, plan_index

    rng = np.random.default_rng(9)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    run = make_run(tmp_path, "m", x, shard_size=250)  # 8 shards
    reads: list[str] = []
    real_read = source.ModelSource.read
    monkeypatch.setattr(source.ModelSource, "read",
                        lambda self, shard: reads.append(shard) or real_read(self, shard))
    roomy = IndexConfig(kind="ivf", nlist=8, nprobe=2, recall_sample=100)
    kind, _, params = plan_index(2000, 16, roomy)
    held = held_vectors_bytes(kind, 2000, 16, params, roomy)
    assert held >= 2000 * 16 * 4
    one = build_index(run, "m", roomy)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 8  # one pass: sample and fill
    # a budget with room for the build but not for holding every row: the shards are read twice
    tight = tiny_budget(build_peak_bytes(2000, 16, roomy) - held + held // 2, kind="ivf", nlist=8,
                        nprobe=2, recall_sample=100)
    assert held_vectors_bytes(kind, 2000, 16, params, tight) == 0
    reads.clear()
    two = build_index(run, "m", tight)
    assert len(reads) == 16 and len(two.manifest.parts) == 1
    assert two.manifest.recall == one.manifest.recall and two.manifest.count == 2000
    s1, p1 = one.search(x[:40], 5)
    s2, p2 = two.search(x[:40], 5)
    np.testing.assert_array_equal(p1, p2)  # the same seeded sample and rows: the same index
    np.testing.assert_allclose(s1, s2, atol=1e-6)


def test_more_parts_than_max_parts_is_one_config_line(tmp_path) -> None:
    x = np.random.default_rng(7).normal(size=(600, 16)).astype(np.float32)
    run = make_run(tmp_path, "m", x)
    with pytest.raises(ConfigError, match="index.max_parts=2") as exc:
        build_index(run, "m", tiny_budget(1200 * 16 * 4 + 600 * 16, kind="flat", max_parts=2))
    assert "\n" not in str(exc.value)
    assert index_state(run, "m")[0] == "missing"  # nothing written


def test_merge_topk_equals_one_search_over_all_rows() -> None:
    rng = np.random.default_rng(8)
    x = normalise(rng.normal(size=(300, 8)))
    q = normalise(rng.normal(size=(20, 8)))
    parts = [(0, 70), (70, 200), (200, 300)]
    results = []
    for lo, hi in parts:
        index = FaissIndex.create(8, "flat", "Flat", {})
        index.add(x[lo:hi])
        results.append(index.search(q, 6))
    scores, pos = merge_topk(results, [lo for lo, _ in parts], 6)
    want_s, want_p = brute(x, 6, q, exclude_self=False)
    np.testing.assert_array_equal(pos, want_p)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)


def _two_models(tmp_path, n: int = 240):
    rng = np.random.default_rng(9)
    a = rng.normal(size=(n, 12)).astype(np.float32)
    b = rng.normal(size=(n, 20)).astype(np.float32)
    run = make_run(tmp_path, "a", a, shard_size=50)
    make_run(tmp_path, "b", b, shard_size=50)
    return run, a, b


def test_the_ensemble_index_ranks_by_mean_cosine_and_is_saved(tmp_path) -> None:
    run, a, b = _two_models(tmp_path)
    session = RunSearch(run)
    ens = session.index(ENSEMBLE)
    assert ens.manifest is not None and ens.manifest.source_models == ["a", "b"]
    assert ens.manifest.dim == 32 and ens.count == 240
    assert (run.index_path(ENSEMBLE) / "_manifest.json").exists()
    mean_cos = (normalise(a) @ normalise(a).T + normalise(b) @ normalise(b).T) / 2
    np.fill_diagonal(mean_cos, -np.inf)
    want = np.argsort(-mean_cos, axis=1, kind="stable")[:, :5]
    ids = [f"img{i:05d}" for i in range(240)]
    scores, pos = session.search(ENSEMBLE, ids, 5)
    np.testing.assert_array_equal(pos, want)
    np.testing.assert_allclose(scores, np.take_along_axis(mean_cos, want, 1), atol=1e-5)
    np.testing.assert_allclose(session.vectors(ENSEMBLE, ids[:3]),
                               ensemble_vectors({"a": a[:3], "b": b[:3]}), atol=1e-6)
    # a subset session never replaces the run's own ensemble
    created = json.loads((run.index_path(ENSEMBLE) / "_manifest.json").read_text())["created"]
    sub = RunSearch(run, ["a"])
    assert sub.index(ENSEMBLE).count == 240
    assert json.loads((run.index_path(ENSEMBLE) / "_manifest.json").read_text())["created"] == created


def test_the_ensemble_of_a_subset_streams_its_shards_and_ranks_by_mean_cosine(tmp_path,
                                                                              monkeypatch) -> None:
    from flagsim.search import source
    from flagsim.search.compare import compare
    from flagsim.search.streamed import StreamedIndex

    run, a, b = _two_models(tmp_path, n=230)
    c = np.random.default_rng(11).normal(size=(230, 7)).astype(np.float32)
    make_run(tmp_path, "c", c, shard_size=50)
    session = RunSearch(run, ["a", "c"])  # not every model: no saved index to use
    ens = session.index(ENSEMBLE)
    assert isinstance(ens.index, StreamedIndex) and ens.index.nbytes() == 0  # holds no vectors
    assert ens.count == 230 and ens.dim == 19 and ens.ids[229] == "img00229"
    assert not run.index_path(ENSEMBLE).exists()  # nothing saved for a subset
    session.index("a"), session.index("c")  # the models' own (flat) indexes, built before counting
    read: list[str] = []
    real = source.ModelSource.read
    monkeypatch.setattr(source.ModelSource, "read",
                        lambda self, shard: read.append(f"{self.model}/{shard}") or real(self, shard))
    ids = [f"img{i:05d}" for i in range(230)]
    scores, pos = session.search(ENSEMBLE, ids, 6)
    mean_cos = (normalise(a) @ normalise(a).T + normalise(c) @ normalise(c).T) / 2
    np.fill_diagonal(mean_cos, -np.inf)
    want = np.argsort(-mean_cos, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(pos, want)
    np.testing.assert_allclose(scores, np.take_along_axis(mean_cos, want, 1), atol=1e-5)
    # one pass: each of the 5 shards of a and c once (the queries' own vectors come from the
    # models' flat indexes)
    assert sorted(read) == sorted(f"{m}/part-{s:05d}.parquet" for m in "ac" for s in range(5))
    read.clear()
    got = compare(str(tmp_path), ["img00003", "img00100"], k=3, models=["a", "c"], session=session)
    first, second = (got.results[q][ENSEMBLE] for q in got.queries)
    assert [h.image_id for h in first] == [ids[p] for p in want[3, :3]]
    assert [h.image_id for h in second] == [ids[p] for p in want[100, :3]]
    assert len(read) == 10  # both queries' ensemble hits in one pass
    # the report's top-k of every image: the images streamed once as queries, and the streamed
    # ensemble searched in batches as large as its byte budget allows (one pass here), not
    # one pass per SEARCH_BATCH rows (5 passes at 50 rows)
    from flagsim.report import explore

    monkeypatch.setattr(explore, "SEARCH_BATCH", 50)
    read.clear()
    table = explore.search_table(session, 3)
    # a's and c's shards as their own queries (10), the ensemble's queries (10) and one pass of
    # its streamed search (10); a pass per 50 rows would make it 70
    assert table.sources[ENSEMBLE] == "searched" and len(read) == 30
    got_ids = [[table.ids[p] for p in row] for row in table.neighbours[ENSEMBLE]]
    assert got_ids == [[ids[p] for p in row[:3]] for row in want]


def test_the_ensemble_is_the_same_whatever_order_the_models_are_named_in(tmp_path) -> None:
    """The run's `all` index joins a's and b's vectors in one order; a session, query or
    comparison naming the models as `b,a` must line its vectors up the same way (it once
    joined them b-first and searched garbage without an error)."""
    from flagsim.search.compare import compare
    from flagsim.search.query import query

    run, a, b = _two_models(tmp_path)
    mean_cos = (normalise(a) @ normalise(a).T + normalise(b) @ normalise(b).T) / 2
    np.fill_diagonal(mean_cos, -np.inf)
    want = np.argsort(-mean_cos, axis=1, kind="stable")[:, :5]
    ids = [f"img{i:05d}" for i in range(240)]
    RunSearch(run).index(ENSEMBLE)  # the run's saved ensemble, built over a then b
    for order in (["b", "a"], ["a", "b"]):
        session = RunSearch(run, order)
        assert session.models == order  # the user's order is kept for display
        scores, pos = session.search(ENSEMBLE, ids, 5)
        np.testing.assert_array_equal(pos, want)
        np.testing.assert_allclose(scores, np.take_along_axis(mean_cos, want, 1), atol=1e-5)
        hits = query(str(tmp_path), "img00007", k=5, models=[*order, ENSEMBLE])
        assert [h.image_id for h in hits.results[ENSEMBLE]] == [ids[p] for p in want[7]]
        got = compare(str(tmp_path), ["img00011"], k=5, models=order)
        assert [h.image_id for h in got.results[got.queries[0]][ENSEMBLE]] == [ids[p] for p in want[11]]
    assert ensemble_vectors({"b": b[:2], "a": a[:2]}).tobytes() == \
        ensemble_vectors({"a": a[:2], "b": b[:2]}).tobytes()


def test_a_saved_ensemble_joined_in_another_order_is_stale_and_rebuilt(tmp_path) -> None:
    run, a, b = _two_models(tmp_path)
    RunSearch(run).index(ENSEMBLE)
    path = run.index_path(ENSEMBLE) / "_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source_models"] = ["b", "a"]  # as an older flagsim wrote for `--models b,a,all`
    path.write_text(json.dumps(manifest))
    state, reason = index_state(run, ENSEMBLE)
    assert state == "stale" and "another order" in reason and "(b, a)" in reason
    assert RunSearch(run).index(ENSEMBLE).manifest.source_models == ["a", "b"]
    assert index_state(run, ENSEMBLE)[0] == "fresh"


def test_an_ensemble_of_models_sharded_differently_warns_that_it_lines_up_partly(tmp_path,
                                                                                 caplog) -> None:
    rng = np.random.default_rng(12)
    run = make_run(tmp_path, "a", rng.normal(size=(240, 6)).astype(np.float32), shard_size=50)
    make_run(tmp_path, "b", rng.normal(size=(240, 5)).astype(np.float32), shard_size=240)
    with caplog.at_level("WARNING"):
        built = build_index(run, ENSEMBLE)
    assert built.count == 50  # a's first shard: the only rows both part-00000 files hold
    warned = [r.getMessage() for r in caplog.records if "line up only partly" in r.getMessage()]
    assert warned and "holds 50 images, fewer than a's 240" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING"):  # the streamed ensemble of a subset says so too
        make_run(tmp_path, "c", rng.normal(size=(240, 3)).astype(np.float32), shard_size=50)
        assert RunSearch(run, ["a", "b"]).index(ENSEMBLE).count == 50
    assert any("holds 50 images" in r.getMessage() for r in caplog.records)
    # models with no image in common: one line that says so
    other = make_run(tmp_path / "x", "a", rng.normal(size=(20, 6)).astype(np.float32))
    make_run(tmp_path / "x", "b", rng.normal(size=(20, 5)).astype(np.float32),
             ids=[f"other{i}" for i in range(20)])
    with pytest.raises(DataError, match="no image of .* is in every one of the models a, b"):
        build_index(other, ENSEMBLE)
    # by default (no --models) index/neighbours/search leave `all` out with a warning: they
    # failed for every model; named, `all` is still the one-line error above
    from flagsim.search.catalog import search_tables
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert search_tables(other, None) == [("a", ()), ("b", ())]
    assert "no image is in every one of the models a, b: no ensemble all" in caplog.text
    assert search_tables(other, ["a", "b", "all"])[-1] == ("all", ("a", "b"))
    assert search_tables(other, ["all"])[-1] == ("all", ("a", "b"))  # named alone: kept too
    assert search_tables(run, None)[-1] == ("all", ("a", "b", "c"))


def test_the_ensemble_goes_stale_when_a_model_is_added(tmp_path) -> None:
    run, a, b = _two_models(tmp_path)
    RunSearch(run).index(ENSEMBLE)
    assert index_state(run, ENSEMBLE)[0] == "fresh"
    make_run(tmp_path, "c", np.random.default_rng(1).normal(size=(240, 4)).astype(np.float32))
    state, reason = index_state(run, ENSEMBLE)
    assert state == "stale" and "other models" in reason
    assert RunSearch(run).index(ENSEMBLE).manifest.source_models == ["a", "b", "c"]


def test_stored_vectors_of_an_ivf_index_come_from_the_one_shard_holding_them(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    run = make_run(tmp_path, "m", x, shard_size=250)
    session = RunSearch(run, cfg=IndexConfig(kind="ivf", nlist=16, recall_sample=50))
    session.index("m")
    from flagsim.search import source

    read: list[str] = []
    real = source.ModelSource.read
    monkeypatch.setattr(source.ModelSource, "read",
                        lambda self, shard: read.append(shard) or real(self, shard))
    got = session.vectors("m", ["img01234", "img01240"])
    np.testing.assert_allclose(got, normalise(x[[1234, 1240]]), atol=1e-6)
    assert read == ["part-00004.parquet"]  # rows 1000-1249: one shard read, once
    # a flat index keeps the vectors: they come from the mapped index, no shard is read
    build_index(run, "m", IndexConfig(kind="flat"))
    flat = RunSearch(run)
    assert flat.index("m").manifest.kind == "flat"
    read.clear()
    np.testing.assert_allclose(flat.vectors("m", ["img00007"]), normalise(x[[7]]), atol=1e-6)
    assert read == []


def test_saved_indexes_load_memory_mapped(tmp_path) -> None:
    x = np.random.default_rng(11).normal(size=(500, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", x)
    for kind in ("flat", "ivf", "hnsw"):
        cfg = IndexConfig(kind=kind, nlist=8, recall_sample=20)
        build_index(run, "m", cfg)
        idx = load_index(run, "m", cfg, build=False)
        assert isinstance(idx.index, VectorIndex) and idx.index.mapped, kind
        assert idx.index.kind == kind and idx.count == 500
        if kind == "ivf":
            # zero-copy mapped lists, not FAISS's older OnDiskInvertedLists (1.8x slower search)
            import faiss

            lists = faiss.extract_index_ivf(idx.index.faiss_index).invlists
            assert type(faiss.downcast_InvertedLists(lists)).__name__ == "ArrayInvertedLists"


class _FakeGpuIndex:
    """Stands in for a FAISS GPU index: refuses k above the GPU limit, as FAISS does."""

    def __init__(self, cpu) -> None:
        self.cpu, self.d, self.ntotal = cpu, cpu.d, cpu.ntotal
        self.calls = 0

    def search(self, q, k):
        self.calls += 1
        if k > GPU_MAX_K:
            raise RuntimeError("k > 2048 not supported on GPU")
        return self.cpu.search(q, k)


def test_k_above_the_gpu_limit_runs_on_the_cpu_copy_with_one_log_line(caplog) -> None:
    import logging

    x = normalise(np.random.default_rng(12).normal(size=(GPU_MAX_K + 100, 4)))
    cpu = FaissIndex.create(4, "flat", "Flat", {})
    cpu.add(x)
    fake = _FakeGpuIndex(cpu.faiss_index)
    index = FaissIndex(cpu.faiss_index, "flat", {}, gpu=fake)
    assert index.device == "gpu"
    with caplog.at_level(logging.INFO, logger="flagsim.search.backend"):
        _, small = index.search(x[:2], 10)
        _, big = index.search(x[:2], GPU_MAX_K + 1)
        index.search(x[:2], GPU_MAX_K + 5)
    assert fake.calls == 1  # only the small search went to the "GPU"
    assert big.shape == (2, GPU_MAX_K + 1) and (big[:, :10] == small).all()
    lines = [r.getMessage() for r in caplog.records if "GPU limit" in r.getMessage()]
    assert lines == [f"k={GPU_MAX_K + 1} is above FAISS's GPU limit of {GPU_MAX_K}: searching on the CPU"]


def test_a_streamed_index_whose_source_changed_since_its_ids_were_read_is_one_line() -> None:
    from flagsim.errors import DataError
    from flagsim.search.source import Block
    from flagsim.search.streamed import StreamedIndex

    class Shards:  # two shards of 3 unit rows; the session had counted 7 rows
        name = "all"
        dim = 2

        def __iter__(self):
            for s in range(2):
                yield Block(f"part-{s:05d}.parquet", [f"i{s}{r}" for r in range(3)],
                            [f"n{s}{r}" for r in range(3)], np.eye(3, 2, dtype=np.float32))

    scores, pos = StreamedIndex(Shards(), 6).search(np.eye(1, 2, dtype=np.float32), 2)
    assert sorted(pos[0].tolist()) == [0, 3] and np.allclose(scores, 1.0)  # exact, global positions
    with pytest.raises(DataError) as err:
        StreamedIndex(Shards(), 7).search(np.eye(1, 2, dtype=np.float32), 2)
    assert str(err.value) == ("the shards of all hold 6 rows, not the 7 read before; "
                              "run the command again")


@pytest.mark.parametrize("command", [
    ["index", "--models", "b"],
    ["query", "img00001", "--model", "b"],
    ["compare", "img00001", "--models", "a,b"],
    ["eval", "--models", "b"],
])
def test_a_named_model_whose_embeddings_are_incomplete_is_one_line_saying_so(tmp_path, capsys,
                                                                             command) -> None:
    """Shards without a manifest (an embed cut short, or an embed --force under way) named with
    --models, on a run whose indexes were built before: the line says they are incomplete and how
    to finish them, not that the run has no embeddings of the model."""
    from flagsim.cli import main

    run, _, _ = _two_models(tmp_path)
    assert main(["index", "--run", str(run.root)]) == 0
    run.manifest("b").delete()
    capsys.readouterr()
    assert main([*command, "--run", str(run.root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "embeddings of model b in" in err and "are incomplete (no manifest)" in err, err
    assert "rerun `flagsim embed` to finish them" in err, err


@pytest.mark.parametrize("command", [["index", "--models", "b"], ["query", "img00001", "--model", "b"]])
def test_a_named_model_of_layout_1_is_told_to_re_embed_with_force(tmp_path, capsys,
                                                                   command) -> None:
    """A model whose manifest lies where layout 1 kept it, named with --models: the line says to
    re-embed with --force (docs/layout.md), not to rerun `flagsim embed`, which refuses it."""
    from flagsim.cli import main

    run, _, _ = _two_models(tmp_path)
    assert main(["index", "--run", str(run.root)]) == 0
    run.manifest("b").move_to(run.legacy_manifest("b"))
    capsys.readouterr()
    assert main([*command, "--run", str(run.root)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    said = "was written by an older flagsim (layout 1, sidecars inside the table folder); " \
           "re-embed it with `flagsim embed --force --models b`"
    assert lines[-1].startswith("flagsim: error: ") and lines[-1].endswith(said), lines
    assert all(said in line for line in lines), lines  # a warning before it says the same
