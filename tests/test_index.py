"""FAISS indexes: exact search equals NumPy brute force, approximate kinds record measured recall,
bad or stale inputs give one-line errors, and indexes live on object stores too."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from runs import make_run

from flagsim.cli import main
from flagsim.config import IndexConfig
from flagsim.errors import ConfigError, DataError
from flagsim.rundir import RunDir
from flagsim.search.build import build_index
from flagsim.search.choice import choose_kind, exact_crossover
from flagsim.search.load import load_index
from flagsim.search.manifest import IDS_FILE, INDEX_FILE, MANIFEST_FILE
from flagsim.search.saved import index_state
from flagsim.search.vectors import normalise
from flagsim.shards import embeddings_table, write_shard


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """One OpenMP thread: on a small shared CI machine FAISS's spinning threads are far slower."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine of every row against all others (itself excluded), in float64."""
    x = vectors.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def test_normalise_gives_unit_rows_and_keeps_zero_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    out = normalise(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-7)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(x[0], [3.0, 4.0])  # input untouched


def test_flat_index_equals_numpy_brute_force(tmp_path) -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(250, 24)).astype(np.float32) * rng.uniform(0.5, 3, (250, 1)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors, shard_size=60)
    idx = load_index(run, "m")
    assert idx.manifest.kind == "flat" and idx.manifest.exact
    assert idx.manifest.count == 250 and idx.manifest.dim == 24
    assert sorted(idx.manifest.shards) == [f"part-{i:05d}.parquet" for i in range(5)]
    ids = [f"img{i:05d}" for i in range(250)]
    scores, pos = idx.search(vectors, 7, exclude=ids)
    want_scores, want_pos = brute_force(vectors, 7)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # the saved files give the same answers
    again = load_index(run, "m", build=False)
    scores2, pos2 = again.search(vectors, 7, exclude=ids)
    np.testing.assert_array_equal(pos2, pos)
    np.testing.assert_allclose(scores2, scores, atol=1e-6)


def test_search_without_exclusion_returns_the_image_itself_first(tmp_path) -> None:
    vectors = np.random.default_rng(2).normal(size=(30, 8)).astype(np.float32)
    idx = load_index(make_run(tmp_path, "m", vectors), "m")
    scores, pos = idx.search(vectors[:5], 3)
    np.testing.assert_array_equal(pos[:, 0], np.arange(5))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_k_larger_than_the_collection_is_one_line_error(tmp_path) -> None:
    idx = load_index(make_run(tmp_path, "m", np.eye(4, dtype=np.float32)), "m")
    idx.check_k(3)
    with pytest.raises(DataError, match=r"k=4 is larger than the collection: model m has 4 images"):
        idx.check_k(4)


def test_choose_kind_rule() -> None:
    cfg = IndexConfig(kind="auto", exact_max_rows=1000, memory_budget_gb=1.0, max_parts=2)
    assert choose_kind(1000, 64, cfg) == "flat"
    assert choose_kind(1001, 64, cfg) == "ivf"
    # 10M x 64 floats (2.4 GiB) do not fit 2 parts of 1 GiB: compressed codes
    assert choose_kind(10_000_000, 64, cfg) == "ivfpq"
    assert choose_kind(10_000_000, 64, cfg.model_copy(update={"max_parts": 3})) == "ivf"
    # without exact_max_rows, auto is exact up to the measured time crossover
    crossover = exact_crossover(32)
    assert 50_000 < crossover < 500_000
    auto = IndexConfig(kind="auto")
    assert choose_kind(crossover, 256, auto) == "flat"
    assert choose_kind(crossover + 1, 256, auto) == "ivf"
    # auto is the default kind; flat stays exact whatever the size
    assert IndexConfig().kind == "auto"
    assert choose_kind(10_000_000, 64, IndexConfig(kind="flat")) == "flat"
    assert choose_kind(10, 4, IndexConfig(kind="hnsw")) == "hnsw"


@pytest.fixture(scope="module")
def random_20k(tmp_path_factory) -> tuple[RunDir, np.ndarray]:
    vectors = np.random.default_rng(3).normal(size=(20_000, 64)).astype(np.float32)
    return make_run(tmp_path_factory.mktemp("r20k"), "m", vectors, shard_size=5000), vectors


def _manifest_json(run: RunDir, model: str) -> dict:
    return json.loads((run.index_path(model) / MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def random_4k(tmp_path_factory) -> tuple[RunDir, np.ndarray]:
    vectors = np.random.default_rng(12).normal(size=(4000, 32)).astype(np.float32)
    return make_run(tmp_path_factory.mktemp("r4k"), "m", vectors, shard_size=1000), vectors


APPROXIMATE = {
    "ivf": ("random_20k", IndexConfig(kind="ivf", recall_sample=300, nprobe=8)),
    "hnsw": ("random_4k", IndexConfig(kind="hnsw", recall_sample=300, hnsw_m=16)),
    # PQ training is the slow part: fewer, shorter vectors keep it quick
    "ivfpq": ("random_4k", IndexConfig(kind="ivfpq", recall_sample=300, nlist=16, nprobe=4, pq_m=8)),
}


@pytest.mark.parametrize("kind", list(APPROXIMATE))
def test_approximate_indexes_record_measured_recall(request, kind) -> None:
    fixture, cfg = APPROXIMATE[kind]
    run, vectors = request.getfixturevalue(fixture)
    idx = build_index(run, "m", cfg)
    man = _manifest_json(run, "m")
    assert man["kind"] == kind and man["exact"] is False
    assert man["recall_k"] == 10 and man["recall_sample"] == 300
    assert 0.0 < man["recall"] <= 1.0
    assert man["recall"] == idx.manifest.recall
    # the recorded recall is a real measurement: recompute it on 300 other queries and compare
    rng = np.random.default_rng(9)
    q = rng.choice(len(vectors), 300, replace=False)
    ids = [f"img{i:05d}" for i in q]
    _, approx = idx.search(vectors[q], 10, exclude=ids)
    x = normalise(vectors)
    sims = x[q] @ x.T
    sims[np.arange(300), q] = -np.inf
    exact = np.argsort(-sims, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert abs(recall - man["recall"]) < 0.1


def test_ivf_recall_is_one_when_every_list_is_probed_and_lower_with_one(random_4k) -> None:
    run, _ = random_4k
    full = build_index(run, "m", IndexConfig(kind="ivf", nlist=32, nprobe=32, recall_sample=200))
    assert full.manifest.params == {"nlist": 32, "nprobe": 32}
    assert full.manifest.recall == 1.0
    one = build_index(run, "m", IndexConfig(kind="ivf", nlist=32, nprobe=1, recall_sample=200))
    assert one.manifest.recall < 0.9


def test_index_command_warns_when_the_measured_recall_is_low(tmp_path, capsys) -> None:
    # 0.30 recall@10 printed in the table with no word of it (docs/query.md aims at 0.95)
    from flagsim.cli import main

    vectors = np.random.default_rng(12).normal(size=(2000, 32)).astype(np.float32)
    make_run(tmp_path, "m", vectors, shard_size=1000)
    base = ["index", "--run", str(tmp_path), "--set", "index.kind=ivf", "--set", "index.nlist=32"]
    assert main([*base, "--set", "index.nprobe=1"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"m: the ivf index finds \d+% of the exact top-10 \(its recall sample\); "
                     r"raise index.nprobe", err), err
    assert main([*base, "--set", "index.nprobe=32", "--force"]) == 0  # recall 1.0: no word
    assert "recall sample" not in capsys.readouterr().err


def test_auto_picks_an_approximate_index_beyond_exact_max_rows(random_4k) -> None:
    run, _ = random_4k
    idx = build_index(run, "m", IndexConfig(kind="auto", exact_max_rows=1000, recall_sample=100))
    assert idx.manifest.kind == "ivf" and idx.manifest.recall is not None
    idx = build_index(run, "m", IndexConfig(kind="auto", recall_sample=100))
    assert idx.manifest.kind == "flat" and idx.manifest.exact and idx.manifest.recall == 1.0


def test_use_gpu_yes_without_a_gpu_is_a_config_error(tmp_path) -> None:
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible to FAISS")
    run = make_run(tmp_path, "m", np.eye(5, dtype=np.float32))
    with pytest.raises(ConfigError, match="use_gpu=yes but FAISS sees no GPU"):
        build_index(run, "m", IndexConfig(use_gpu="yes"))


def test_shard_of_another_model_is_refused_naming_the_file(tmp_path) -> None:
    vectors = np.random.default_rng(4).normal(size=(20, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors, shard_size=10)
    foreign = embeddings_table([f"x{i}" for i in range(10)], ["x"] * 10, "other", vectors[:10])
    write_shard(run, "m", 1, foreign)
    with pytest.raises(DataError) as err:
        load_index(run, "m")
    msg = str(err.value)
    assert "part-00001.parquet" in msg and "other" in msg and "\n" not in msg


def test_mismatched_dimension_is_refused_naming_the_file(tmp_path) -> None:
    vectors = np.random.default_rng(5).normal(size=(20, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors, shard_size=10)
    wrong = embeddings_table([f"y{i}" for i in range(10)], ["y"] * 10, "m",
                             np.ones((10, 6), np.float32))
    write_shard(run, "m", 1, wrong)
    with pytest.raises(DataError) as err:
        build_index(run, "m")
    msg = str(err.value)
    assert "part-00001.parquet" in msg and "dim 6" in msg and "\n" not in msg


def test_index_of_another_model_is_refused_naming_the_file(tmp_path) -> None:
    vectors = np.random.default_rng(6).normal(size=(20, 8)).astype(np.float32)
    run = make_run(tmp_path, "a", vectors)
    make_run(tmp_path, "b", vectors)
    load_index(run, "a")
    load_index(run, "b")
    src = run.index_path("a") / MANIFEST_FILE
    (run.index_path("b") / MANIFEST_FILE).write_bytes(src.read_bytes())
    with pytest.raises(DataError, match=r"model=b/_manifest.json describes the index of model a, not b"):
        load_index(run, "b")


def test_stale_index_is_an_error_without_build_and_rebuilt_with_it(tmp_path) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors, shard_size=20)
    first = load_index(run, "m")
    assert index_state(run, "m")[0] == "fresh"
    changed = vectors.copy()
    changed[20:] = rng.normal(size=(20, 8))
    make_run(tmp_path, "m", changed, shard_size=20)  # part-00001 rewritten, same row count
    state, reason = index_state(run, "m")
    assert state == "stale" and "part-00001.parquet changed" in reason
    with pytest.raises(DataError) as err:
        load_index(run, "m", build=False)
    msg = str(err.value)
    assert "model=m/_manifest.json is stale" in msg and "part-00001.parquet" in msg
    assert "\n" not in msg
    rebuilt = load_index(run, "m")
    assert rebuilt.manifest.shards != first.manifest.shards
    assert index_state(run, "m")[0] == "fresh"
    ids = [f"img{i:05d}" for i in range(40)]
    _, pos = rebuilt.search(changed, 3, exclude=ids)
    np.testing.assert_array_equal(pos, brute_force(changed, 3)[1])


def test_corrupt_index_file_is_a_one_line_error_naming_it(tmp_path) -> None:
    run = make_run(tmp_path, "m", np.random.default_rng(8).normal(size=(12, 4)).astype(np.float32))
    load_index(run, "m")
    (run.index_path("m") / INDEX_FILE).write_bytes(b"not an index")
    with pytest.raises(DataError, match=r"index\.faiss is 12 bytes but .*_manifest\.json records"):
        load_index(run, "m", build=False)
    assert load_index(run, "m").count == 12  # load-or-build repairs it


# --- committing an index: old manifest out first, files, new manifest (sizes, sha256) last ---


def _check_line(tmp_path, capsys) -> str:
    """`flagsim index --check`'s one error line (asserting it failed)."""
    capsys.readouterr()  # drop what earlier steps logged
    assert main(["index", "--run", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flagsim: error:") and len(err.splitlines()) == 1
    return err


def _assert_exact(run: RunDir, vectors: np.ndarray, kind: str = "flat") -> None:
    idx = load_index(run, "m", build=False)
    assert idx.manifest.kind == kind
    ids = [f"img{i:05d}" for i in range(len(vectors))]
    np.testing.assert_array_equal(idx.search(vectors, 5, exclude=ids)[1], brute_force(vectors, 5)[1])


def test_manifest_records_size_and_sha256_of_each_index_file(tmp_path) -> None:
    import hashlib

    run = make_run(tmp_path, "m", np.random.default_rng(20).normal(size=(30, 8)).astype(np.float32))
    build_index(run, "m")
    files = _manifest_json(run, "m")["files"]
    assert sorted(files) == [IDS_FILE, INDEX_FILE]
    for name, record in files.items():
        data = (run.index_path("m") / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not (run.root / "_lock.json").exists()  # the run lock is released after the writes


@pytest.mark.parametrize("crash_at", [IDS_FILE, MANIFEST_FILE])
def test_crash_while_replacing_an_index_never_reads_as_up_to_date(
    tmp_path, monkeypatch, capsys, crash_at
) -> None:
    from flagsim.storage import Location

    vectors = np.random.default_rng(21).normal(size=(300, 16)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors)
    build_index(run, "m", IndexConfig(kind="flat"))
    real_put, real_write = Location.put_file, Location.write_bytes

    def crash_put(self, local):
        if self.name == crash_at:
            raise KeyboardInterrupt  # killed after index.faiss was replaced
        real_put(self, local)

    def crash_write(self, data, staging=None):
        if self.name == crash_at:
            raise KeyboardInterrupt
        real_write(self, data, staging)

    monkeypatch.setattr(Location, "put_file", crash_put)
    monkeypatch.setattr(Location, "write_bytes", crash_write)
    with pytest.raises(KeyboardInterrupt):
        build_index(run, "m", IndexConfig(kind="hnsw", hnsw_m=8, recall_sample=20))
    monkeypatch.undo()
    assert not (run.root / "_lock.json").exists()  # released on the interrupt too
    # index.faiss now holds the HNSW graph: no flat manifest may vouch for it
    assert index_state(run, "m")[0] == "missing"
    assert "no index at" in _check_line(tmp_path, capsys)
    with pytest.raises(DataError, match="run `flagsim index --models m`"):
        load_index(run, "m", build=False)
    build_index(run, "m")  # a rerun repairs it
    assert main(["index", "--run", str(tmp_path), "--check"]) == 0
    _assert_exact(run, vectors)


def test_hnsw_index_file_under_an_old_flat_manifest_is_caught(tmp_path, capsys) -> None:
    vectors = np.random.default_rng(22).normal(size=(300, 16)).astype(np.float32)
    run = make_run(tmp_path / "a", "m", vectors)
    other = make_run(tmp_path / "b", "m", vectors)
    build_index(run, "m")
    build_index(other, "m", IndexConfig(kind="hnsw", hnsw_m=8, recall_sample=20))
    hnsw = (other.index_path("m") / INDEX_FILE).read_bytes()
    (run.index_path("m") / INDEX_FILE).write_bytes(hnsw)  # what the old commit order could leave
    state, reason = index_state(run, "m")
    assert state == "stale" and "index.faiss is" in reason and "bytes but" in reason
    err = _check_line(tmp_path / "a", capsys)
    assert "index.faiss" in err and "run `flagsim index --models m`" in err
    with pytest.raises(DataError) as exc:
        load_index(run, "m", build=False)
    assert "index.faiss" in str(exc.value) and "\n" not in str(exc.value)
    assert main(["index", "--run", str(tmp_path / "a")]) == 0  # rebuilt
    assert "rebuilt" in capsys.readouterr().out
    _assert_exact(run, vectors)


def test_flipped_byte_in_the_index_file_is_one_line_on_load_and_check(tmp_path, capsys) -> None:
    vectors = np.random.default_rng(23).normal(size=(40, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors)
    build_index(run, "m")
    loc = run.index_path("m") / INDEX_FILE
    data = bytearray(loc.read_bytes())
    data[len(data) - 7] ^= 0x10  # inside the vectors: FAISS itself would read it happily
    loc.write_bytes(bytes(data))
    with pytest.raises(DataError) as exc:
        load_index(run, "m", build=False, verify=True)
    msg = str(exc.value)
    assert "index.faiss does not match the sha256" in msg and "\n" not in msg
    assert msg.endswith("rerun `flagsim index --models m`")
    assert "index.faiss does not match the sha256" in _check_line(tmp_path, capsys)
    assert main(["index", "--run", str(tmp_path)]) == 0  # `flagsim index` repairs it
    assert "rebuilt" in capsys.readouterr().out
    assert main(["index", "--run", str(tmp_path), "--check"]) == 0
    _assert_exact(run, vectors)


def test_flagsim_index_builds_checks_and_repairs_the_ensemble_index_too(tmp_path, capsys) -> None:
    """`all`'s index is one `flagsim neighbours` searches: `flagsim index` builds it with the
    models', `--check` verifies it, and the fix its error names (`--models all`) repairs it."""
    from flagsim.search.catalog import ENSEMBLE

    rng = np.random.default_rng(25)
    run = make_run(tmp_path, "a", rng.normal(size=(40, 8)).astype(np.float32))
    make_run(tmp_path, "b", rng.normal(size=(40, 5)).astype(np.float32))
    assert main(["index", "--run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "│ all " in out and "│ a " in out and "│ b " in out
    assert index_state(run, ENSEMBLE, verify=True)[0] == "fresh"
    loc = run.index_path(ENSEMBLE) / INDEX_FILE
    data = bytearray(loc.read_bytes())
    data[len(data) - 7] ^= 0x10
    loc.write_bytes(bytes(data))
    err = _check_line(tmp_path, capsys)
    assert "model=all" in err and err.endswith("run `flagsim index --models all`")
    assert main(["index", "--run", str(tmp_path), "--models", "all"]) == 0
    assert "rebuilt" in capsys.readouterr().out
    assert main(["index", "--run", str(tmp_path), "--check"]) == 0
    assert "all: " in capsys.readouterr().out
    # one model named: no ensemble; the ensemble named over one model: one line
    assert main(["index", "--run", str(tmp_path), "--models", "a", "--check"]) == 0
    assert "all:" not in capsys.readouterr().out
    assert main(["index", "--run", str(tmp_path), "--models", "a,all"]) == 2
    assert "needs at least two models" in capsys.readouterr().err


def test_an_embedding_manifest_whose_total_disagrees_with_its_shards_builds_from_the_shards(
        tmp_path) -> None:
    """`rows` edited below the shards' sum sized the index too small: the build looped forever.
    The shards' own counts (each checked when read) decide; the index stays fresh after."""
    run = make_run(tmp_path, "m", np.random.default_rng(26).normal(size=(30, 8)).astype(np.float32))
    loc = tmp_path / "_meta" / "embeddings" / "model=m" / "manifest.json"
    data = json.loads(loc.read_text())
    data["rows"] = 29
    loc.write_text(json.dumps(data))
    assert build_index(run, "m").count == 30
    assert index_state(run, "m")[0] == "fresh"


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("rows", True, "'dim' and 'rows' must be whole numbers"),
    ("dim", "8", "'dim' and 'rows' must be whole numbers"),
    ("shards", {"part-00000.parquet": "30"}, "a shard's row count is not a whole number"),
])
def test_an_embedding_manifest_with_wrong_types_is_one_line(tmp_path, capsys, field, value,
                                                            expected) -> None:
    run = make_run(tmp_path, "m", np.random.default_rng(26).normal(size=(30, 8)).astype(np.float32))
    loc = tmp_path / "_meta" / "embeddings" / "model=m" / "manifest.json"
    data = json.loads(loc.read_text())
    data[field] = value
    loc.write_text(json.dumps(data))
    with pytest.raises(DataError, match=re.escape(expected)):
        build_index(run, "m")
    for argv in (["index", "--run", str(tmp_path)], ["query", "img00001", "--run", str(tmp_path)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1
        assert err.endswith("re-embed with `flagsim embed --force --models m`")


@pytest.mark.parametrize(("field", "value"), [
    ("files", None), ("kind", "x"), ("params", []), ("parts", [None]), ("shards", "abc"),
    ("count", "30"), ("files", {"index.faiss": 5})])
def test_an_edited_index_manifest_is_one_line(tmp_path, capsys, field, value) -> None:
    make_run(tmp_path, "m", np.random.default_rng(27).normal(size=(30, 8)).astype(np.float32))
    assert main(["index", "--run", str(tmp_path)]) == 0
    capsys.readouterr()
    loc = tmp_path / "index" / "model=m" / MANIFEST_FILE
    data = json.loads(loc.read_text())
    data[field] = value
    loc.write_text(json.dumps(data))
    assert main(["query", "img00001", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a valid index manifest" in err and len(err.splitlines()) == 1
    assert err.endswith("rebuild it with `flagsim index --force --models m`")
    assert main(["index", "--run", str(tmp_path), "--force"]) == 0  # what the line says works


def test_index_manifest_without_file_records_is_stale_and_rebuilt(tmp_path) -> None:
    vectors = np.random.default_rng(24).normal(size=(20, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors)
    build_index(run, "m")
    where = run.index_path("m") / MANIFEST_FILE
    old = where.read_json()
    del old["files"]  # as written before files were recorded
    where.write_json(old)
    state, reason = index_state(run, "m")
    assert state == "stale" and "records no size and sha256 of index.faiss" in reason
    assert load_index(run, "m").manifest.files  # load-or-build rebuilds it
    assert index_state(run, "m")[0] == "fresh"


def test_index_build_while_another_process_holds_the_run_is_refused(tmp_path) -> None:
    from flagsim.runlock import RunLockedError, run_lock

    vectors = np.random.default_rng(25).normal(size=(20, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors)
    build_index(run, "m")
    before = (run.index_path("m") / MANIFEST_FILE).read_bytes()
    with run_lock(run.root, "flagsim embed"), pytest.raises(RunLockedError) as exc:
        build_index(run, "m", IndexConfig(kind="hnsw"))
    assert "'flagsim embed'" in str(exc.value) and "\n" not in str(exc.value)
    # refused before touching anything: the old index is intact and still up to date
    assert (run.index_path("m") / MANIFEST_FILE).read_bytes() == before
    assert index_state(run, "m")[0] == "fresh"
    assert not (run.root / "_lock.json").exists()


def test_cli_index_builds_reports_and_checks(tmp_path, capsys) -> None:
    vectors = np.random.default_rng(10).normal(size=(50, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors, shard_size=25)
    assert main(["index", "--run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "built" in out and "flat" in out
    assert main(["index", "--run", str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["index", "--run", str(tmp_path), "--check"]) == 0
    make_run(tmp_path, "m", vectors[::-1].copy(), shard_size=25)
    assert main(["index", "--run", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flagsim: error:") and "stale" in err and len(err.splitlines()) == 1
    assert main(["index", "--run", str(tmp_path), "--kind", "hnsw"]) == 0
    assert json.loads((run.index_path("m") / MANIFEST_FILE).read_text())["kind"] == "hnsw"


def test_check_reports_an_index_built_with_other_settings_as_index_would_rebuild_it(tmp_path,
                                                                                  capsys) -> None:
    """`--check` exits 2 where `flagsim index` says "built with other index settings; rebuilding"
    (docs/reliability.md: a stale index, other settings included, is reported by --check)."""
    vectors = np.random.default_rng(11).normal(size=(60, 8)).astype(np.float32)
    make_run(tmp_path, "m", vectors, shard_size=30)
    assert main(["index", "--run", str(tmp_path), "--kind", "hnsw"]) == 0
    assert main(["index", "--run", str(tmp_path), "--kind", "hnsw", "--check"]) == 0
    capsys.readouterr()
    assert main(["index", "--run", str(tmp_path), "--check"]) == 2  # index.kind auto: flat
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "built with other index settings" in err, err
    assert main(["index", "--run", str(tmp_path)]) == 0 and "rebuilt" in capsys.readouterr().out
    assert main(["index", "--run", str(tmp_path), "--check"]) == 0


def test_index_force_rebuilds_without_hashing_the_index_it_replaces(tmp_path, capsys,
                                                                     monkeypatch) -> None:
    from flagsim.search import build_tasks

    run = make_run(tmp_path, "m", np.random.default_rng(13).normal(size=(40, 8)).astype(np.float32))
    assert main(["index", "--run", str(tmp_path)]) == 0
    path = run.index_path("m").local_path() / MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "old": True}))  # gone on a rebuild
    checked: list[str] = []
    real = build_tasks.index_state
    monkeypatch.setattr(build_tasks, "index_state",
                        lambda run, model, *a, **kw: checked.append(model) or real(run, model, *a, **kw))
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["index", "--run", str(tmp_path), "--force"]) == 0
    assert " built " in capsys.readouterr().out
    assert checked == []  # --force: the old index's sha256 is not worth computing
    manifest = json.loads(path.read_text())
    assert "old" not in manifest and manifest["count"] == 40
    assert main(["index", "--run", str(tmp_path)]) == 0  # without --force: checked, kept
    assert checked == ["m"] and " up to date " in capsys.readouterr().out


def test_index_on_an_object_store_run() -> None:
    from s3server import patched_environ, running_s3

    with running_s3() as s3, patched_environ(s3.env):
        _index_round_trip(f"s3://{s3.new_bucket()}/run")


def _index_round_trip(root: str) -> None:
    vectors = np.random.default_rng(11).normal(size=(30, 8)).astype(np.float32)
    run = make_run(root, "m", vectors, shard_size=10)
    built = load_index(run, "m")
    assert (run.index_path("m") / INDEX_FILE).exists()
    loaded = load_index(RunDir.at(root), "m", build=False)
    ids = [f"img{i:05d}" for i in range(30)]
    np.testing.assert_array_equal(loaded.search(vectors, 4, exclude=ids)[1],
                                  built.search(vectors, 4, exclude=ids)[1])
    assert not (run.root / "_lock.json").exists()
    # a flipped byte is caught on the object store too (streamed hash for --check)
    loc = run.index_path("m") / INDEX_FILE
    data = bytearray(loc.read_bytes())
    data[-5] ^= 1
    loc.write_bytes(bytes(data))
    assert index_state(run, "m")[0] == "fresh"  # same size: only the hash tells
    assert "does not match the sha256" in index_state(run, "m", verify=True)[1]
    with pytest.raises(DataError, match="index.faiss does not match the sha256"):
        load_index(run, "m", build=False, verify=True)
    build_index(run, "m")
    assert index_state(run, "m", verify=True)[0] == "fresh"


def test_gpu_failure_falls_back_to_cpu(tmp_path, monkeypatch, caplog) -> None:
    import flagsim.search.backend as index_mod

    def no_kernels(index, kind, float16=None):
        raise RuntimeError("no GPU kernel for this index")

    monkeypatch.setattr(index_mod, "gpu_count", lambda: 1)
    monkeypatch.setattr(index_mod, "to_gpu", no_kernels)
    vectors = np.random.default_rng(13).normal(size=(300, 8)).astype(np.float32)
    run = make_run(tmp_path, "m", vectors)
    idx = build_index(run, "m", IndexConfig(kind="ivf", nlist=4, nprobe=4, recall_sample=50))
    assert idx.manifest.device == "cpu" and idx.manifest.recall == 1.0
    assert "cannot build on GPU (no GPU kernel for this index); building on CPU" in caplog.text
    loaded = load_index(run, "m", IndexConfig(use_gpu="yes"), build=False)
    assert loaded.index.device == "cpu" and loaded.count == 300


def test_a_build_removes_what_builds_that_died_on_this_host_staged_and_nothing_else(tmp_path
                                                                                  ) -> None:
    import socket
    import subprocess
    import sys

    from flagsim.search.build import OWNER_FILE, remove_dead_staging

    run = make_run(tmp_path, "m", np.random.default_rng(12).normal(size=(30, 4)).astype(np.float32))
    staging = tmp_path / "_tmp"
    host = socket.gethostname()
    folders = {
        "dead": f"index-{host}-4242-ab12cd34",
        "live": f"index-{host}-4343-ef56gh78",
        "other host": f"index-{host}x-4242-ab12cd34",  # unlocked, but not this host's to judge
        "host with a dash": f"index-{host}-7-4242-ab12cd34",  # host `<host>-7`
        "no owner file": f"index-{host}-4444-ij90kl12",  # one from before owner files
        "not a build": "images-0123.parquet.d",
    }
    for what, name in folders.items():
        (staging / name).mkdir(parents=True)
        (staging / name / "index.faiss").write_bytes(b"partial")
        if what != "no owner file":
            (staging / name / OWNER_FILE).touch()
    # a live build: a process holding its owner file's lock; the dead build's holder was killed
    hold = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    holders = {}
    for what in ("dead", "live"):
        holders[what] = subprocess.Popen(
            [sys.executable, "-c", hold, str(staging / folders[what] / OWNER_FILE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holders[what].stdout.readline().strip() == "locked"
    holders["dead"].kill()
    holders["dead"].wait()
    try:
        build_index(run, "m", IndexConfig(kind="flat"))  # removes the dead build's first
        left = {what for what, name in folders.items() if (staging / name).exists()}
        assert left == set(folders) - {"dead"}
        assert sorted(p.name for p in staging.iterdir()) == sorted(folders[w] for w in left)
    finally:
        holders["live"].stdin.close()
        holders["live"].wait()
    assert remove_dead_staging(run) == 1  # the live build has ended: its folder goes now
    assert not (staging / folders["live"]).exists()
