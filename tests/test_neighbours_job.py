"""The neighbours Ray Data job: brute-force equal (actors, index parts, the ensemble), recall
reported, and a SIGKILLed job resumed part by part (real local Ray, real files)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import runs

from flagsim.cli import main
from flagsim.config import load_config
from flagsim.rundir import RunDir
from flagsim.search.build import build_index
from flagsim.search.manifest import read_index_manifest
from flagsim.search.neighbours import part_marker, read_neighbours, write_neighbours

K = 7


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_brute_force(run_dir, model: str, vectors: np.ndarray, k: int) -> None:
    """The table of `model` is the exact top-k by cosine of each row of `vectors` (already the
    vectors searched: unit rows, or the ensemble's), the row itself excluded."""
    sims = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    df = read_neighbours(str(run_dir), model).to_pandas()
    n = len(vectors)
    assert len(df) == n * k
    df = df.sort_values(["query_id", "rank"])
    assert df["query_id"].tolist() == [f"img{i:05d}" for i in range(n) for _ in range(k)]
    assert df["rank"].tolist() == list(range(1, k + 1)) * n
    got = np.array([int(s[3:]) for s in df["neighbour_id"]]).reshape(n, k)
    np.testing.assert_array_equal(got, order)
    np.testing.assert_allclose(df["score"].to_numpy().reshape(n, k),
                               np.take_along_axis(sims, order, 1), atol=1e-5)


@pytest.mark.parametrize("actors", [1, 2])
def test_job_equals_brute_force_for_each_model_and_the_ensemble(tmp_path, ray_local, actors):
    rng = np.random.default_rng(actors)
    a = rng.normal(size=(230, 24)).astype(np.float32)
    b = rng.normal(size=(230, 9)).astype(np.float32)
    runs.make_run(tmp_path, "a", a, shard_size=64)
    runs.make_run(tmp_path, "b", b, shard_size=64)
    cfg = load_config(None, [f"neighbours.num_actors={actors}", "neighbours.batch_size=50"])
    results = write_neighbours(str(tmp_path), k=K, cfg=cfg)
    assert [(r.model, r.queries, r.parts, r.written) for r in results] == [
        ("a", 230, 4, 4), ("b", 230, 4, 4), ("all", 230, 4, 4)]
    assert_brute_force(tmp_path, "a", _unit(a), K)
    assert_brute_force(tmp_path, "b", _unit(b), K)
    ensemble = np.concatenate([_unit(a), _unit(b)], axis=1) / math.sqrt(2)  # mean cosine
    assert_brute_force(tmp_path, "all", ensemble, K)
    run = RunDir.at(str(tmp_path))
    names = sorted(p.name for p in Path(run.neighbours_dir("all").path).iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(4)]  # one part per query shard
    marker = part_marker(run, "all", "part-00003.parquet").read_json()
    assert marker["queries"] == 230 - 3 * 64 and marker["rows"] == (230 - 3 * 64) * K
    assert marker["k"] == K
    manifest = run.neighbours_manifest("all").read_json()
    assert manifest["source_models"] == ["a", "b"] and manifest["queries"] == 230
    assert manifest["index_kind"] == "flat" and manifest["index_recall"] == 1.0


def test_the_ensemble_table_is_right_whatever_order_the_models_are_named_in(tmp_path, ray_local):
    """`--models b,a,all` on a run whose `all` index joins a then b: the query shards are joined
    in the index's order too (they were joined b-first and the table was silently wrong)."""
    rng = np.random.default_rng(4)
    a = rng.normal(size=(150, 24)).astype(np.float32)
    b = rng.normal(size=(150, 9)).astype(np.float32)
    runs.make_run(tmp_path, "a", a, shard_size=64)
    runs.make_run(tmp_path, "b", b, shard_size=64)
    ensemble = np.concatenate([_unit(a), _unit(b)], axis=1) / math.sqrt(2)  # mean cosine
    write_neighbours(str(tmp_path), k=K)
    assert_brute_force(tmp_path, "all", ensemble, K)
    run = RunDir.at(str(tmp_path))
    shutil.rmtree(run.neighbours_dir("all").path)
    shutil.rmtree(Path(run.neighbours_manifest("all").path).parent)
    results = write_neighbours(str(tmp_path), k=K, models=["b", "a", "all"])
    assert [(r.model, r.written) for r in results] == [("b", 0), ("a", 0), ("all", 3)]
    assert_brute_force(tmp_path, "all", ensemble, K)
    assert run.neighbours_manifest("all").read_json()["source_models"] == ["a", "b"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to tell 2 threads from 1")
def test_search_actor_uses_its_faiss_threads_on_the_thread_that_calls_it(tmp_path) -> None:
    """OpenMP's thread count is per thread, and Ray Data may call an actor on another thread
    than its constructor's, one that starts from Ray's OMP_NUM_THREADS=<num_cpus> (measured:
    flat search on one core instead of two). The actor sets its count where it searches."""
    import threading

    import faiss

    from flagsim.search.neighbours_job import SearchActor, index_identity, read_shard

    x = np.random.default_rng(9).normal(size=(150, 8)).astype(np.float32)
    run = runs.make_run(tmp_path, "a", x, shard_size=150)
    cfg = load_config(None, ["index.kind=flat"])
    build_index(str(tmp_path), "a", cfg.index)
    manifest = read_index_manifest(run, "a")
    assert manifest is not None
    actor = SearchActor(str(tmp_path), "a", 0, 1, 5, cfg.index, 2, index_identity(manifest))
    assert actor.error is None
    batch = read_shard({"shard": np.array(["part-00000.parquet"], dtype=object)}, str(tmp_path),
                       "a", [])
    seen: dict[str, object] = {}

    def ray_data_thread() -> None:
        faiss.omp_set_num_threads(1)  # what a new thread of a num_cpus=1 Ray worker starts with
        seen["rows"] = actor(batch)
        seen["threads"] = faiss.omp_get_max_threads()

    t = threading.Thread(target=ray_data_thread)
    t.start()
    t.join()
    assert seen["threads"] == 2
    assert seen["rows"].num_rows == 150 * 5


def test_search_actor_outside_ray_asks_for_no_gpu_and_starts_no_ray(monkeypatch) -> None:
    """Called in one process (tests, benchmarks), the actor's GPU check must not start a local
    Ray just to learn that the driver was given no GPU (about 5 s on this machine)."""
    import ray

    from flagsim.search import neighbours_job

    asked: list[int] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: asked.append(1) or [0])
    assert neighbours_job._has_gpu() is False and asked == []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # inside a Ray worker with a GPU
    assert neighbours_job._has_gpu() is True and asked == [1]


def _budget_for_parts(n: int, dim: int, parts: float) -> float:
    """An index.memory_budget_gb that puts a flat index of n x dim into about `parts` parts
    (the build's fixed overhead, see choice.build_overhead_bytes, plus a share of the data)."""
    overhead = (min(n, 1000) + min(n, 65536)) * dim * 4
    return (overhead + n * dim * 4 / parts) / 1024**3


def test_parted_index_is_searched_part_by_part_exactly(tmp_path, ray_local):
    x = np.random.default_rng(5).normal(size=(300, 16)).astype(np.float32)
    runs.make_run(tmp_path, "a", x, shard_size=70)
    cfg = load_config(None, [f"index.memory_budget_gb={_budget_for_parts(300, 16, 3.5)}",
                             "neighbours.batch_size=32"])
    build_index(str(tmp_path), "a", cfg.index)
    manifest = read_index_manifest(RunDir.at(str(tmp_path)), "a")
    assert manifest is not None and manifest.kind == "flat" and len(manifest.parts) >= 3
    (result,) = write_neighbours(str(tmp_path), k=K, models=["a"], cfg=cfg)
    assert result.written == 5 and result.rows == 300 * K
    assert_brute_force(tmp_path, "a", _unit(x), K)


def test_buffer_is_a_few_query_shards_of_vectors_and_rows_unless_configured(tmp_path) -> None:
    from flagsim.search.neighbours import largest_shard
    from flagsim.search.neighbours_job import MIN_BUFFER_BYTES, ROW_BYTES, JobPlan, buffer_bytes

    cfg = load_config(None, [])
    plan = JobPlan(run_uri="r", model="a", members=(), shards=("part-00000.parquet",), k=10,
                   parts=2, index_cfg=cfg.index, num_actors=3, batch_size=64, index_identity="x",
                   dim=768, shard_rows=10_000)
    per_shard = 10_000 * (4 * 768 + ROW_BYTES * 11)
    assert buffer_bytes(plan) == (2 * 3 + 3) * per_shard  # one per actor, three in between
    small = JobPlan(**{**plan.__dict__, "dim": 8, "shard_rows": 100, "parts": 1, "num_actors": 1})
    assert buffer_bytes(small) == MIN_BUFFER_BYTES
    assert buffer_bytes(JobPlan(**{**plan.__dict__, "buffer_mb": 1.5})) == int(1.5 * 2**20)
    assert buffer_bytes(JobPlan(**{**plan.__dict__, "shard_rows": 0})) is None  # Ray's own
    runs.make_run(tmp_path, "a", np.ones((150, 4), np.float32), shard_size=64)
    runs.make_run(tmp_path, "b", np.ones((150, 4), np.float32), shard_size=100)
    run = RunDir.at(str(tmp_path))
    assert largest_shard(run, "a", ()) == 64 and largest_shard(run, "all", ("a", "b")) == 100
    assert largest_shard(run, "missing", ()) == 0


def test_the_object_store_limit_keeps_the_other_limits_on_this_ray_and_on_dataclass_rays() -> None:
    from dataclasses import dataclass

    from ray.data import ExecutionResources

    from flagsim.search.neighbours_job import with_object_store_limit

    limits = ExecutionResources(cpu=3, gpu=1, object_store_memory=10)
    got = with_object_store_limit(limits, 2**26)
    assert (got.cpu, got.gpu, got.object_store_memory) == (3, 1, 2**26)
    assert limits.object_store_memory == 10  # a copy: the dataset's limits object is not shared

    @dataclass
    class OldExecutionResources:  # Ray's ExecutionResources before copy() took overrides
        cpu: float | None = None
        gpu: float | None = None
        object_store_memory: int | None = None

    old = with_object_store_limit(OldExecutionResources(cpu=3, gpu=1), 2**26)
    assert old == OldExecutionResources(cpu=3, gpu=1, object_store_memory=2**26)


def test_a_buffer_smaller_than_one_shard_still_gives_the_exact_table(tmp_path, ray_local,
                                                                     monkeypatch):
    """The buffer bounds only this job's dataset (the process's DataContext keeps its limit),
    and a budget under one block still makes progress through a chain of index parts."""
    import ray

    x = np.random.default_rng(8).normal(size=(300, 16)).astype(np.float32)
    runs.make_run(tmp_path, "a", x, shard_size=70)
    cfg = load_config(None, [f"index.memory_budget_gb={_budget_for_parts(300, 16, 3.5)}",
                             "neighbours.batch_size=32", "neighbours.buffer_mb=0.001"])
    build_index(str(tmp_path), "a", cfg.index)
    seen: list[object] = []
    real = ray.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):
        seen.append(self.context.execution_options.resource_limits.object_store_memory)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    before = ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    (result,) = write_neighbours(str(tmp_path), k=K, models=["a"], cfg=cfg)
    assert seen == [int(0.001 * 2**20)]
    after = ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    assert after == before != seen[0]
    assert result.written == 5
    assert_brute_force(tmp_path, "a", _unit(x), K)


def test_ivf_recall_is_in_the_manifest_and_the_summary(tmp_path, ray_local, capsys, monkeypatch):
    x = np.random.default_rng(6).normal(size=(1200, 16)).astype(np.float32)
    runs.make_run(tmp_path, "a", x, shard_size=400)
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["neighbours", "--run", str(tmp_path), "-k", "5", "--set", "index.kind=ivf",
                 "--set", "index.nprobe=2", "--set", "index.recall_sample=200"]) == 0
    out = capsys.readouterr().out
    index = read_index_manifest(RunDir.at(str(tmp_path)), "a")
    assert index is not None and index.kind == "ivf" and index.recall_k == 10
    assert 0 < index.recall < 1  # 2 of the lists probed: approximate
    manifest = RunDir.at(str(tmp_path)).neighbours_manifest("a").read_json()
    assert manifest["index_recall"] == index.recall
    assert (manifest["recall_k"], manifest["recall_sample"]) == (10, 200)
    row = next(line for line in out.splitlines() if " a " in f" {line} " and "ivf" in line)
    assert f"{index.recall:.3f}@10" in row


# --- SIGKILL and resume ------------------------------------------------------------------------

def _cli(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flagsim.cli", *extra, "neighbours", "--run", str(run), "-k",
            "5", "--set", "ray.num_cpus=2", "--set", "neighbours.batch_size=40"]


def _state(run: RunDir, shards: list[str]) -> dict[str, tuple[int, str]]:
    """part file -> (its mtime in ns, its marker's text), for the parts present: staged (written
    before the table's last part) or in the table folder (moved there, mtime kept)."""
    from flagsim.search.neighbours import staged_parts

    out = {}
    for s in shards:
        part = Path(staged_parts(run, "a").path) / s
        if not part.exists():
            part = Path(run.neighbours_dir("a").path) / s
        marker = Path(part_marker(run, "a", s).path)
        if part.exists() and marker.exists():
            out[s] = (part.stat().st_mtime_ns, marker.read_text())
    return out


def test_sigkilled_job_resumes_by_part_and_a_second_rerun_is_a_no_op(tmp_path):
    """The last query shard is replaced by a named pipe nobody writes to, so its read task
    blocks and the job cannot finish before the kill; the rerun gets the real file back."""
    x = np.random.default_rng(7).normal(size=(240, 12)).astype(np.float32)
    run = runs.make_run(tmp_path / "run", "a", x, shard_size=40)
    build_index(run, "a")
    shards = [f"part-{i:05d}.parquet" for i in range(6)]
    last = Path(run.model_dir("a").path) / shards[-1]
    real = tmp_path / "real.parquet"
    shutil.copy(last, real)
    last.unlink()
    os.mkfifo(last)
    fifo = tmp_path / "fifo"
    os.link(last, fifo)  # a second name for the pipe, kept when the real file replaces it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(_cli(tmp_path / "run", "-q"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_state(run, shards)) >= 3:  # (the last ones may wait in Ray's prefetch)
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:  # a reader still waiting on the pipe gets end of file instead of hanging
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    before = _state(run, shards)
    assert 2 <= len(before) < 6 and shards[-1] not in before
    assert not run.neighbours_manifest("a").exists()
    assert not run.neighbours_dir("a").exists()  # staged: no partial table to read meanwhile

    os.replace(real, last)  # the same bytes at the same path: the rerun can finish
    done = subprocess.run(_cli(tmp_path / "run"), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_brute_force(run.root.path, "a", _unit(x), 5)
    after = _state(run, shards)
    assert set(after) == set(shards)
    assert {s: after[s] for s in before} == before  # written before the kill: not rewritten
    assert f"searching {6 - len(before)} of 6 query shard(s) ({len(before)} kept)" in done.stderr
    manifest = json.loads(Path(run.neighbours_manifest("a").path).read_text())
    assert (manifest["parts"], manifest["queries"], manifest["rows"]) == (6, 240, 240 * 5)

    again = subprocess.run(_cli(tmp_path / "run", "-v"), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _state(run, shards) == after
    assert "neighbour table up to date" in again.stderr
    assert "starting an embedded local Ray" in done.stderr
    assert "starting an embedded local Ray" not in again.stderr  # nothing to do: no Ray at all
    assert Path(run.neighbours_manifest("a").path).read_text() == json.dumps(
        manifest, indent=2, sort_keys=True) + "\n"


def test_a_corrupt_index_file_is_one_line_from_the_search_actor(tmp_path, ray_local, capsys):
    """The size matches (the driver's check passes); the actor's sha256 check refuses it."""
    runs.make_run(tmp_path, "a", np.random.default_rng(8).normal(size=(50, 8)).astype(np.float32))
    build_index(str(tmp_path), "a")
    index_file = Path(RunDir.at(str(tmp_path)).index_path("a").path) / "index.faiss"
    data = bytearray(index_file.read_bytes())
    data[-1] ^= 0xFF
    index_file.write_bytes(bytes(data))
    assert main(["-q", "neighbours", "--run", str(tmp_path), "-k", "3"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("flagsim: error:")]
    assert errors == [f"flagsim: error: neighbours a: {index_file} does not match the sha256 in "
                      f"{index_file.parent / '_manifest.json'} (corrupt or replaced); rerun "
                      "`flagsim index --models a`"]
    assert not RunDir.at(str(tmp_path)).neighbours_manifest("a").exists()


def test_neighbour_rows_gather_ids_and_names_and_keep_a_placeholder_for_a_query_without_hits(
) -> None:
    import pyarrow as pa

    from flagsim.search.neighbours_job import EXPECTED, ROW, SHARD, neighbour_rows

    ids = pa.array(["a", "b", "c", "d"])
    names = pa.array(["A", None, "C", "D"])
    batch = {SHARD: np.array(["part-00003.parquet"] * 3, dtype=object),
             ROW: np.array([0, 1, 2]), EXPECTED: np.array([3, 3, 3]),
             "query_id": np.array(["a", "b", "x"], dtype=object),
             "query": np.array(["A", "", "X"], dtype=object)}
    pos = np.array([[2, 1, 3], [0, -1, -1], [-1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7], [0.5, np.nan, np.nan], [np.nan] * 3], np.float32)
    rows = neighbour_rows(batch, scores, pos, ids, names).to_pylist()
    got = [(r["query_id"], r["row"], r["rank"], r["neighbour_id"], r["neighbour"]) for r in rows]
    assert got == [("a", 0, 1, "c", "C"), ("a", 0, 2, "b", None), ("a", 0, 3, "d", "D"),
                   ("b", 1, 1, "a", "A"), ("x", 2, 0, None, None)]  # rank 0: no hit at all
    assert {r["shard"] for r in rows} == {"part-00003.parquet"}
    assert [r["expected"] for r in rows] == [3] * 5
    assert [r["score"] for r in rows[:4]] == pytest.approx([0.9, 0.8, 0.7, 0.5])
