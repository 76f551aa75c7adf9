"""Index builds as Ray tasks: sized by the cluster (CPUs, GPU nodes, memory), never run in the
driver of a command that uses Ray, and a failed build keeps the others'."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import runs

from flagsim.cli import main
from flagsim.config import IndexConfig, load_config
from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.search import build_tasks
from flagsim.search.build_tasks import TASK_BASE_BYTES, ensure_indexes, task_cpus, task_memory
from flagsim.search.choice import build_peak_bytes, parts_needed, plan_index
from flagsim.search.manifest import read_index_manifest
from flagsim.search.neighbours import write_neighbours


@pytest.mark.parametrize(("cluster", "nodes", "tasks", "cpus"), [
    (2, [2], 1, 2),  # one model on a laptop: both cores, not Ray's default of one
    (2, [2], 6, 1),  # more models than cores: one each, at least
    (48, [16, 16, 16], 2, 16),  # never more than one node has
    (48, [16, 16, 16], 5, 9),
    (3, [3], 2, 1),
])
def test_index_tasks_get_an_equal_share_of_the_cluster_within_one_node(
        cluster: float, nodes: list[float], tasks: int, cpus: int) -> None:
    assert task_cpus(cluster, nodes, tasks) == cpus


def test_a_gpu_index_task_is_sized_by_the_nodes_that_have_a_gpu(monkeypatch) -> None:
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 64.0, "memory": 200e9}},  # a CPU-only head
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 50e9}},
             {"Alive": False, "Resources": {"CPU": 96.0, "GPU": 8.0, "memory": 900e9}}]  # gone
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert build_tasks.node_cpus(with_gpu=True) == [8.0]
    assert build_tasks.node_cpus(with_gpu=False) == [64.0, 8.0]
    assert build_tasks.node_memory(with_gpu=True) == [50e9]
    # a 16-CPU task can only run on the head: its memory is capped by the head's, not another's
    assert build_tasks.node_memory(with_gpu=False, min_cpus=16) == [200e9]
    # one model on that cluster: the GPU task asks for what its node has, not the head's 64
    assert task_cpus(72, build_tasks.node_cpus(with_gpu=True), 1) == 8


def test_a_build_task_reserves_its_build_peak_within_the_largest_node() -> None:
    cfg = IndexConfig(kind="flat")
    n, dim = 100_000, 256
    assert build_peak_bytes(n, dim, cfg) == n * dim * 4 + (1000 + 65536) * dim * 4
    assert task_memory(n, dim, cfg, [64e9]) == TASK_BASE_BYTES + build_peak_bytes(n, dim, cfg)
    # more than any node's Ray memory: capped there, so the task can still be placed
    assert task_memory(n, dim, cfg, [5e8, 3e8]) == int(5e8)
    assert task_memory(n, dim, cfg, []) == TASK_BASE_BYTES + build_peak_bytes(n, dim, cfg)


def test_the_build_peak_of_a_parted_index_is_one_part_and_stays_within_the_budget() -> None:
    cfg = IndexConfig(kind="flat", memory_budget_gb=0.09)
    n, dim = 100_000, 256  # 98 MiB of vectors: more than the 92 MiB budget
    kind, _, params = plan_index(n, dim, cfg)
    parts = parts_needed(kind, n, dim, params, cfg)
    assert parts > 1
    peak = build_peak_bytes(n, dim, cfg)
    assert peak <= cfg.memory_budget_gb * 1024**3
    assert peak < build_peak_bytes(n, dim, IndexConfig(kind="flat"))  # one part, not all


def _never_in_the_driver(monkeypatch) -> None:
    """The driver process may not build an index (a Ray worker imports its own flagsim)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an index was built in the driver")

    import flagsim.search.build
    import flagsim.search.load

    monkeypatch.setattr(flagsim.search.build, "build_index", refuse)
    monkeypatch.setattr(flagsim.search.load, "build_index", refuse)


def test_neighbours_build_missing_indexes_in_ray_tasks_not_in_the_driver(tmp_path, ray_local,
                                                                           monkeypatch) -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(90, 12)).astype(np.float32)
    b = rng.normal(size=(90, 5)).astype(np.float32)
    runs.make_run(tmp_path, "a", a, shard_size=40)
    runs.make_run(tmp_path, "b", b, shard_size=40)
    _never_in_the_driver(monkeypatch)
    results = write_neighbours(str(tmp_path), k=3, cfg=load_config(None, []))
    assert [(r.model, r.queries, r.written) for r in results] == [
        ("a", 90, 3), ("b", 90, 3), ("all", 90, 3)]
    run = RunDir.at(str(tmp_path))
    for m, dim in (("a", 12), ("b", 5), ("all", 17)):
        man = read_index_manifest(run, m)
        assert man is not None and (man.count, man.dim) == (90, dim)
    assert read_index_manifest(run, "all").source_models == ["a", "b"]


def test_the_index_command_on_a_cluster_builds_in_ray_tasks(tmp_path, ray_local, monkeypatch,
                                                             capsys) -> None:
    runs.make_run(tmp_path, "a", np.random.default_rng(4).normal(size=(60, 8)).astype(np.float32),
                  shard_size=25)
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a cluster (here the session's Ray, already up)
    _never_in_the_driver(monkeypatch)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["index", "--run", str(tmp_path)]) == 0
    assert " built " in capsys.readouterr().out
    assert read_index_manifest(RunDir.at(str(tmp_path)), "a").count == 60
    assert main(["index", "--run", str(tmp_path)]) == 0  # fresh: kept
    assert " up to date " in capsys.readouterr().out


def test_query_on_a_cluster_builds_a_missing_index_in_a_ray_task(tmp_path, ray_local, monkeypatch,
                                                                  capsys) -> None:
    rng = np.random.default_rng(8)
    a = rng.normal(size=(50, 8)).astype(np.float32)
    runs.make_run(tmp_path, "a", a, shard_size=20)
    runs.make_run(tmp_path, "b", rng.normal(size=(50, 4)).astype(np.float32), shard_size=20)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    _never_in_the_driver(monkeypatch)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["query", "--run", str(tmp_path), "img00007", "-k", "3"]) == 0
    out = capsys.readouterr().out
    run = RunDir.at(str(tmp_path))
    for m in ("a", "b", "all"):  # the models' and the ensemble's indexes, built and saved
        assert read_index_manifest(run, m).count == 50
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    scores = unit @ unit[7]
    scores[7] = -np.inf
    assert f"img{int(np.argmax(scores)):05d}" in out  # model a's first hit, from that index


def test_compare_and_eval_build_on_the_config_s_ray_cluster(tmp_path, ray_local, monkeypatch
                                                             ) -> None:
    from flagsim.search.compare import compare
    from flagsim.search.evaluate import evaluate

    rng = np.random.default_rng(10)
    runs.make_run(tmp_path, "a", rng.normal(size=(40, 6)).astype(np.float32), shard_size=20)
    runs.make_run(tmp_path, "b", rng.normal(size=(40, 3)).astype(np.float32), shard_size=20)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _never_in_the_driver(monkeypatch)
    cfg = load_config(None, ["ray.address=auto"])  # the cluster named by the config alone
    got = compare(str(tmp_path), ["img00003"], k=2, cfg=cfg)
    assert set(got.results[got.queries[0]]) == {"a", "b", "all"}
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("query,similar\nimg00001,img00002\n")
    scores = evaluate(str(tmp_path), str(pairs), cfg=cfg)
    assert list(scores["model"]) == ["a", "b", "all"] and (scores["pairs"] == 1).all()
    run = RunDir.at(str(tmp_path))
    assert [read_index_manifest(run, m).count for m in ("a", "b", "all")] == [40, 40, 40]


def test_the_index_command_without_a_cluster_builds_here_and_starts_no_ray(tmp_path) -> None:
    runs.make_run(tmp_path, "a", np.random.default_rng(5).normal(size=(60, 8)).astype(np.float32),
                  shard_size=25)
    code = ("import sys\nfrom flagsim.cli import main\n"
            f"assert main(['index', '--run', {str(tmp_path)!r}]) == 0\n"
            "print('ray imported:', 'ray' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ray imported: False" in out.stdout
    assert read_index_manifest(RunDir.at(str(tmp_path)), "a").count == 60


def test_a_build_task_s_warnings_reach_the_driver_s_log(tmp_path, ray_local, caplog) -> None:
    import logging

    # `pixels` is 1152-d in the registry: 8-d vectors under its name make the build warn
    runs.make_run(tmp_path, "pixels", np.random.default_rng(7).normal(size=(30, 8)).astype(
        np.float32), shard_size=15)
    with caplog.at_level(logging.WARNING, logger="flagsim"):
        built = ensure_indexes(str(tmp_path), [("pixels", ())], load_config(None, []), on_ray=True)
    assert built[0].status == "built" and built[0].manifest.count == 30
    assert "pixels: 8-d embeddings, the registry's model is 1152-d" in caplog.messages


HOLD = """
import sys
from flagsim.runlock import run_lock
from flagsim.storage import Location
with run_lock(Location.parse(sys.argv[1]), "flagsim index --models other"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_failed_build_is_one_line_and_the_other_builds_finish_first(tmp_path, ray_local
                                                                       ) -> None:
    import threading
    import time

    rng = np.random.default_rng(6)
    runs.make_run(tmp_path, "bad", rng.normal(size=(40, 6)).astype(np.float32), shard_size=20,
                  ids=[f"img{i % 30:05d}" for i in range(40)])  # 10 ids twice
    runs.make_run(tmp_path, "good", rng.normal(size=(300, 16)).astype(np.float32), shard_size=100)
    # another index commit holds the run lock for 8 s: "good" waits for it to commit, "bad"
    # fails before it commits anything (its duplicate ids are found while it is built)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        threading.Timer(8.0, holder.stdin.close).start()
        start = time.monotonic()
        with pytest.raises(DataError) as err:
            ensure_indexes(str(tmp_path), [("bad", ()), ("good", ())], load_config(None, []),
                           on_ray=True)
        waited = time.monotonic() - start
    finally:
        holder.wait(timeout=60)
    assert str(err.value).startswith("index bad: ") and "duplicate image ids" in str(err.value)
    assert "\n" not in str(err.value)
    assert waited >= 7.5  # raised only once "good" could commit, not when "bad" failed
    run = RunDir.at(str(tmp_path))
    assert read_index_manifest(run, "bad") is None  # nothing half-written
    good = read_index_manifest(run, "good")
    assert good is not None and good.count == 300


def _title(pid: int) -> str:
    """The process title of `pid` (a Ray worker's is `ray::<task name>` while it runs a task)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


def test_a_build_task_whose_worker_dies_is_retried_once_then_fails_in_one_line(tmp_path, ray_local
                                                                              ) -> None:
    import signal
    import socket
    import threading
    import time

    rng = np.random.default_rng(9)
    runs.make_run(tmp_path, "doomed", rng.normal(size=(60, 8)).astype(np.float32), shard_size=20)
    runs.make_run(tmp_path, "good", rng.normal(size=(60, 8)).astype(np.float32), shard_size=20)
    # a held run lock keeps both builds waiting to commit, so their workers can be found
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    raised: list[BaseException] = []

    def build() -> None:
        try:
            ensure_indexes(str(tmp_path), [("doomed", ()), ("good", ())], load_config(None, []),
                           on_ray=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            raised.append(exc)

    title = "ray::" + build_tasks.task_name("doomed")
    staging, mine = tmp_path / "_tmp", f"index-{socket.gethostname()}-"
    killed: list[int] = []
    try:
        assert holder.stdout.readline().strip() == "locked"
        driver = threading.Thread(target=build)
        driver.start()
        for _ in range(2):  # the task's first run, then Ray's one retry (max_retries=1)
            # the workers of this test's builds, from their staging folders (named after their
            # pid) once they staged files (a build then waits for the lock to commit); the
            # doomed one by its title
            deadline = time.monotonic() + 120
            while True:
                pids = {int(f.name[len(mine):].split("-")[0]) for f in staging.glob(f"{mine}*")
                        if list(f.glob("*.parquet"))} - set(killed)
                doomed = [pid for pid in pids if _title(pid) == title]
                if doomed:
                    break
                assert time.monotonic() < deadline, f"no worker titled {title} staged files"
                time.sleep(0.05)
            os.kill(doomed[0], signal.SIGKILL)
            killed.append(doomed[0])
        holder.stdin.close()  # "good" may commit now
        driver.join(timeout=300)
    finally:
        holder.stdin.close() if not holder.stdin.closed else None
        holder.wait(timeout=60)
    assert not driver.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], DataError), raised
    message = str(raised[0])
    assert message.startswith("index doomed: its Ray task failed: ") and "\n" not in message
    run = RunDir.at(str(tmp_path))
    assert read_index_manifest(run, "doomed") is None  # nothing half-written
    assert read_index_manifest(run, "good").count == 60  # the other build kept
    assert not list((tmp_path / "index").glob("model=doomed/*"))
    # what a killed build staged is left behind until the next build starts: Ray's retry
    # removed the first run's, the rerun below removes the retry's
    assert len(list(staging.glob("index-*"))) == 1
    built = ensure_indexes(str(tmp_path), [("doomed", ())], load_config(None, []), on_ray=True)
    assert built[0].status == "built" and built[0].manifest.count == 60
    assert not list(staging.glob("index-*"))


def test_the_pipeline_builds_its_indexes_in_ray_tasks(tmp_path, bundled_dir, ray_local,
                                                      monkeypatch) -> None:
    folder = tmp_path / "five"
    folder.mkdir()
    for p in sorted((bundled_dir / "images").glob("*.png"))[:5]:
        shutil.copy(p, folder)
    run = tmp_path / "run"
    _never_in_the_driver(monkeypatch)
    assert main(["pipeline", "--set", "embed.models=[pixels]", "--set", "images.source=folder",
                 "--set", f"images.path={folder}", "--run", str(run), "--no-progress",
                 "--no-report"]) == 0
    man = read_index_manifest(RunDir.at(str(run)), "pixels")
    assert man is not None and man.count == 5
