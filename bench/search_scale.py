"""Figure 8: the neighbour table at scale, driven through flagsim's CLI, next to bare FAISS.

For each dimension d and size N: seeded clustered unit vectors are written as Parquet parts and
imported with `flagsim import-embeddings`; then for the exact (`index.kind=flat`) and the
automatically chosen approximate index (`index.kind=auto` with `index.exact_max_rows` below N),
`flagsim index` and `flagsim neighbours -k 10` run as subprocesses (wall time, peak RSS of the
driver and of its whole process tree, Ray's included), and `bench/search_bare.py` does the same
all-vs-all search in one process with the factory string and nprobe of flagsim's index manifest.
recall@10 of both neighbour tables is computed here on a fixed sample of queries against exact
brute force. Only the CLI and the files it writes are used, so the harness survives a rewrite of
the search layer.

Sizes: `FLAGSIM_BENCH_SEARCH="256:100k,300k,1M;768:100k,300k,1M"` (the default); a size is
measured only while its wall time, predicted from the sizes measured before it, fits
`FLAGSIM_BENCH_SEARCH_CASE_S` (default 600 s for flagsim + bare) and the figure's budget
`FLAGSIM_BENCH_SEARCH_BUDGET_S` (default 1800 s); the others are projected from the fitted
slope and marked so. `FLAGSIM_BENCH_SEARCH_KINDS=approx` (or `flat`) measures one kind only. `FLAGSIM_BENCH_SEARCH_CLUSTERS` sets the number of clusters (default
1000; 40 with --quick); `FLAGSIM_BENCH_SEARCH_DIR` keeps the work folder (default: a temporary one).
`FLAGSIM_BENCH_SEARCH_RAY=running` runs flagsim against a Ray head the figure starts once
(`ray start --head`, as on a cluster where jobs are submitted to a running Ray) instead of the
embedded local Ray each `flagsim neighbours` starts and stops (`embedded`, the default); the
head's processes then count in the process tree's memory and CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import targets as T
from bench.common import Figure, Table, fmt

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MODEL = "synthetic"
K = 10
CHUNK = 10_000  # rows per generator chunk: the data of size N is a prefix of any larger size's
KINDS = ("flat", "approx")
#: assumed exponents of cost growth while fewer than two sizes are measured
ASSUMED_SLOPE = {"flat": 2.0, "approx": 1.5}
DEFAULT_SIZES = "256:100k,300k,1M;768:100k,300k,1M"
QUICK_SIZES = "64:2k,4k"
CLUSTERS = 1000  # 100 vectors a cluster at 100k
QUICK_CLUSTERS = 40


def parse_sizes(text: str) -> list[tuple[int, list[int]]]:
    """`"256:100k,300k;768:1M"` -> [(256, [100000, 300000]), (768, [1000000])]."""
    out = []
    for group in filter(None, (g.strip() for g in text.split(";"))):
        dim, _, ns = group.partition(":")
        sizes = []
        for tok in filter(None, (t.strip().lower() for t in ns.split(","))):
            mult = {"k": 1_000, "m": 1_000_000}.get(tok[-1], 1)
            sizes.append(int(float(tok.rstrip("km")) * mult))
        if not dim.strip().isdigit() or not sizes:
            raise ValueError(f"bad size group {group!r}: expected D:N1,N2 (e.g. 256:100k,1M)")
        out.append((int(dim), sorted(sizes)))
    return out


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clusters:
    """A seeded Gaussian mixture on the unit sphere: `n_clusters` unit centres, each row a centre
    plus isotropic noise of norm about `spread`, then L2-normalised."""

    d: int
    seed: int = 0
    n_clusters: int = 1000
    spread: float = 1.0

    def centres(self) -> np.ndarray:
        c = np.random.default_rng([self.seed, self.d]).standard_normal((self.n_clusters, self.d),
                                                                       dtype=np.float32)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def chunk(self, i: int, centres: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.d, i])
        which = rng.integers(0, self.n_clusters, CHUNK)
        x = centres[which] + rng.standard_normal((CHUNK, self.d), dtype=np.float32) * (
            self.spread / math.sqrt(self.d))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def rows(self, n: int, block: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, vectors) blocks covering rows [0, n)."""
        centres = self.centres()
        for i in range(0, math.ceil(n / CHUNK)):
            x = self.chunk(i, centres)[: n - i * CHUNK]
            for s in range(0, len(x), block):
                yield i * CHUNK + s, x[s : s + block]


def row_id(pos: int) -> str:
    return f"v{pos:09d}"


def write_parquet(folder: Path, gen: Clusters, n: int, part_rows: int = 50_000) -> int:
    """Rows [0, n) as Parquet parts (id, name, vector list<float32>); the bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    buf: list[np.ndarray] = []
    first = 0
    part = 0
    total = 0

    def flush(start: int, rows: list[np.ndarray]) -> int:
        x = np.concatenate(rows)
        m, d = x.shape
        ids = [row_id(start + j) for j in range(m)]
        vec = pa.ListArray.from_arrays(pa.array(np.arange(0, (m + 1) * d, d, dtype=np.int32)),
                                       pa.array(x.ravel()))
        table = pa.table({"id": ids, "name": [f"synthetic {start + j}" for j in range(m)],
                          "vector": vec})
        path = folder / f"part-{part:05d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
        return path.stat().st_size

    for start, x in gen.rows(n):
        if not buf:
            first = start
        buf.append(x)
        if sum(len(b) for b in buf) >= part_rows:
            total += flush(first, buf)
            part += 1
            buf = []
    if buf:
        total += flush(first, buf)
    return total


def exact_topk(gen: Clusters, n: int, sample: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k positions of the sample rows among rows [0, n), each row itself excluded,
    by streaming brute force over the generator (memory: the sample plus one block)."""
    q = np.concatenate([x for _, x in _select(gen, n, sample)])
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for start, x in gen.rows(n, block=CHUNK):
        sims = q @ x.T
        own = sample - start
        inside = (own >= 0) & (own < len(x))
        sims[np.nonzero(inside)[0], own[inside]] = -np.inf
        cat_s = np.concatenate([best_s, sims], 1)
        cat_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)),
                                                        sims.shape)], 1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cat_s, top, 1)
        best_i = np.take_along_axis(cat_i, top, 1)
    return best_i


def _select(gen: Clusters, n: int, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for start, x in gen.rows(n):
        sel = rows[(rows >= start) & (rows < start + len(x))] - start
        if len(sel):
            yield start, x[sel]


def recall_at_k(exact: np.ndarray, approx: np.ndarray, k: int = K) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the rows."""
    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) / k


def sample_rows(n: int, size: int = 1000) -> np.ndarray:
    """The fixed recall sample (seed 1234), sorted."""
    return np.sort(np.random.default_rng(1234).choice(n, size=min(size, n), replace=False))


def table_topk(run: Path, sample: np.ndarray, k: int = K) -> np.ndarray:
    """The sample rows' neighbour positions (rank order) read from flagsim's neighbour table
    (every Parquet file under RUN/neighbours/model=<MODEL>/); -1 where a rank is missing."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    files = sorted(str(p) for p in (run / "neighbours" / f"model={MODEL}").rglob("*.parquet"))
    if not files:
        raise RuntimeError(f"no neighbour table under {run}/neighbours/model={MODEL}")
    want = [row_id(int(p)) for p in sample]
    t = ds.dataset(files, format="parquet").to_table(
        columns=["query_id", "rank", "neighbour_id"], filter=pc.field("query_id").isin(want))
    out = np.full((len(sample), k), -1, np.int64)
    where = {row_id(int(p)): i for i, p in enumerate(sample)}
    for qid, rank, nid in zip(t.column("query_id").to_pylist(), t.column("rank").to_pylist(),
                              t.column("neighbour_id").to_pylist(), strict=True):
        if 1 <= rank <= k:
            out[where[qid], rank - 1] = int(nid[1:])
    return out


# --- measuring a subprocess -------------------------------------------------------------------


@dataclass
class Measured:
    """One subprocess: wall time, peak RSS of the process and of its process tree, CPU time."""

    cmd: list[str]
    rc: int = 0
    wall_s: float = 0.0
    peak_driver_mib: float = 0.0
    peak_tree_mib: float = 0.0
    # the driver's RSS split (sampled, so a spike between samples can be missed): its private
    # memory (RssAnon) and the shared pages it maps (RssShmem: Ray's object store)
    peak_driver_anon_mib: float = 0.0
    peak_driver_shmem_mib: float = 0.0
    max_processes: int = 1
    cpu_s: float = 0.0  # user + system CPU of the whole tree (each process's last reading)
    load_before: float = 0.0  # 1-minute load average when it started and when it ended
    load_after: float = 0.0
    stdout: str = ""
    stderr_tail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "stdout"}


def measure(cmd: Sequence[str], env: dict[str, str] | None = None, interval_s: float = 0.1,
            timeout_s: float | None = None, also: int | None = None) -> Measured:
    """Run `cmd`, sampling with psutil the RSS of the process and the sum over it and all its
    descendants (an embedded Ray's GCS, raylet and workers); the driver's peak is its kernel
    high-water mark (VmHWM, reset by exec), so a spike between two samples is not missed.
    (wait4's ru_maxrss is not used: on Linux it starts from the parent's RSS at fork.)
    `also`: the pid of a running process (a Ray head) whose descendants count in the tree too,
    their CPU from the start of `cmd` on."""
    import psutil

    m = Measured(list(cmd))
    head = psutil.Process(also) if also else None
    base: dict[int, float] = {}  # CPU the head's processes had used before `cmd` started
    for c in head.children(recursive=True) if head else []:
        with contextlib.suppress(psutil.Error):
            t = c.cpu_times()
            base[c.pid] = t.user + t.system
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=str(REPO))
        ps = psutil.Process(proc.pid)
        stop = threading.Event()
        cpu: dict[int, float] = {}
        m.load_before = os.getloadavg()[0]

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(psutil.Error):
                    own = ps.memory_info().rss
                    m.peak_driver_mib = max(m.peak_driver_mib, _hwm(proc.pid) / 2**20)
                    split = _status(proc.pid, "RssAnon", "RssShmem")
                    m.peak_driver_anon_mib = max(m.peak_driver_anon_mib, split["RssAnon"] / 2**20)
                    m.peak_driver_shmem_mib = max(m.peak_driver_shmem_mib,
                                                  split["RssShmem"] / 2**20)
                    procs = ps.children(recursive=True)
                    if head is not None:
                        with contextlib.suppress(psutil.Error):
                            procs += head.children(recursive=True)
                    tree = own
                    for c in procs:
                        with contextlib.suppress(psutil.Error):
                            tree += c.memory_info().rss
                            t = c.cpu_times()
                            cpu[c.pid] = t.user + t.system - base.get(c.pid, 0.0)
                    m.peak_driver_mib = max(m.peak_driver_mib, own / 2**20)
                    m.peak_tree_mib = max(m.peak_tree_mib, tree / 2**20)
                    m.max_processes = max(m.max_processes, 1 + len(procs))
                stop.wait(interval_s)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        deadline = None if timeout_s is None else t0 + timeout_s
        status = None
        hwm = 0
        while status is None:
            hwm = max(hwm, _hwm(proc.pid))  # up to the exit (a zombie has no VmHWM)
            pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = st
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.02)
        m.wall_s = time.perf_counter() - t0
        stop.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        m.rc = proc.returncode
        m.peak_driver_mib = max(m.peak_driver_mib, hwm / 2**20)
        m.peak_tree_mib = max(m.peak_tree_mib, m.peak_driver_mib)
        m.load_after = os.getloadavg()[0]
        # the driver's own CPU (wait4) plus each descendant's last sampled reading; wait4 also
        # counts the descendants the driver reaped, so take the larger of the two views
        m.cpu_s = max(usage.ru_utime + usage.ru_stime, sum(cpu.values()))
        out.seek(0)
        err.seek(0)
        m.stdout = out.read().decode(errors="replace")
        m.stderr_tail = err.read().decode(errors="replace")[-3000:]
    return m


def _hwm(pid: int) -> int:
    """The process's peak RSS so far in bytes (VmHWM of /proc/PID/status), 0 when unreadable."""
    return _status(pid, "VmHWM")["VmHWM"]


def _status(pid: int, *keys: str) -> dict[str, int]:
    """Memory fields of /proc/PID/status in bytes (each 0 when unreadable)."""
    out = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _env(ray_head: RayHead | None = None) -> dict[str, str]:
    """The subprocesses' environment: an embedded local Ray each, or the figure's running head."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray_head is not None:
        env.update(RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="disabled")
    return env


def ray_mode() -> str:
    """FLAGSIM_BENCH_SEARCH_RAY: `embedded` (default) or `running`."""
    mode = (os.environ.get("FLAGSIM_BENCH_SEARCH_RAY") or "embedded").strip()
    if mode not in ("embedded", "running"):
        raise ValueError(f"FLAGSIM_BENCH_SEARCH_RAY: {mode!r}; valid: embedded, running")
    return mode


@dataclass
class RayHead:
    address: str  # host:port of its GCS
    pid: int  # `ray start --block`: its processes are this one's descendants


@contextlib.contextmanager
def running_ray(root: Path, timeout_s: float = 120) -> Iterator[RayHead]:
    """A local Ray head (`ray start --head --block`, no dashboard, token auth off on loopback)
    for the whole figure, ready when a driver has connected once; stopped at the end."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**_env(), "RAY_AUTH_MODE": "disabled"}
    temp = Path(tempfile.mkdtemp(prefix="fsray-"))  # short: Ray's socket paths have a limit
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--block", "--num-cpus", str(os.cpu_count() or 1),
           "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--include-dashboard=false", "--temp-dir", str(temp), "--disable-usage-stats"]
    with (root / "ray-head.log").open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = RayHead(f"127.0.0.1:{port}", proc.pid)
    try:
        deadline = time.monotonic() + timeout_s
        probe = [sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"]
        while subprocess.run(probe, env={**env, "RAY_ADDRESS": head.address},
                             capture_output=True, timeout=timeout_s).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start: see {root / 'ray-head.log'}")
            time.sleep(1)
        yield head
    finally:  # this head only (not `ray stop`, which stops every Ray of the machine)
        import signal

        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.terminate()  # `ray start --block` stops what it started
            proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def flagsim_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flagsim.cli", "-q", *args]


def _checked(m: Measured, what: str) -> Measured:
    if m.rc != 0:
        last = (m.stderr_tail.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"{what} exited {m.rc}: {last}")
    return m


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def index_manifest(run: Path) -> dict[str, Any]:
    found = _json(run / "index" / f"model={MODEL}" / "_manifest.json")
    if found is None:
        raise RuntimeError(f"flagsim index wrote no manifest under {run}/index/model={MODEL}")
    return found


def neighbours_manifest(run: Path) -> dict[str, Any] | None:
    for path in sorted(run.rglob("manifest.json")):
        if "neighbours" in path.parts and f"model={MODEL}" in path.parts:
            return _json(path)
    return None


# --- one size ---------------------------------------------------------------------------------


def index_settings(kind: str) -> list[str]:
    """The --set options of a kind: exact flat, or auto forced past exact search (so the
    approximate kind, nlist and nprobe are flagsim's own choice)."""
    common = ["--set", "index.use_gpu='no'"]
    if kind == "flat":
        return ["--set", "index.kind=flat", *common]
    return ["--set", "index.kind=auto", "--set", "index.exact_max_rows=1", *common]


def run_kind(run: Path, src: Path, gen: Clusters, n: int, kind: str, exact: np.ndarray,
             sample: np.ndarray, work: Path, ray_head: RayHead | None = None) -> dict[str, Any]:
    env, also = _env(ray_head), (ray_head.pid if ray_head else None)
    sets = index_settings(kind)
    idx = _checked(measure(flagsim_cmd("index", "--run", str(run), "--force", *sets), env,
                           also=also), f"flagsim index ({kind})")
    man = index_manifest(run)
    nb = _checked(measure(flagsim_cmd("neighbours", "--run", str(run), "-k", str(K), *sets), env,
                          also=also), f"flagsim neighbours ({kind})")
    nman = neighbours_manifest(run) or {}
    steady = steady_state(run, nb.wall_s)
    flagsim_recall = recall_at_k(exact, table_topk(run, sample))
    params = man.get("params") or {}
    nlist = params.get("nlist")
    ntrain = min(n, 64 * nlist) if nlist else 0
    if man.get("kind") == "ivfpq":
        ntrain = min(n, max(ntrain, 256 * 39))
    out = work / f"bare-{kind}.npy"
    bare_cmd = [sys.executable, "-m", "bench.search_bare", "--source", str(src), "--factory",
                man["factory"], "-k", str(K), "--train", str(ntrain), "--out", str(out)]
    if params.get("nprobe"):
        bare_cmd += ["--nprobe", str(params["nprobe"])]
    bare = _checked(measure(bare_cmd, _env()), f"bare FAISS ({kind})")
    bare_times = json.loads(bare.stdout.strip().splitlines()[-1])
    bare_ids = np.load(out, mmap_mode="r")
    bare_recall = recall_at_k(exact, np.asarray(bare_ids[sample]))
    del bare_ids
    out.unlink()
    faiss_file = (man.get("files") or {}).get("index.faiss", {})
    flagsim_s = idx.wall_s + nb.wall_s
    flagsim_cpu = idx.cpu_s + nb.cpu_s
    return {
        "n": n, "d": gen.d, "kind": kind, "ray": "running" if ray_head else "embedded",
        "index_kind": man.get("kind"),
        "factory": man.get("factory"), "params": params, "device": man.get("device"),
        "manifest_recall": man.get("recall"), "neighbours_manifest": nman,
        "index": idx.as_dict(), "neighbours": nb.as_dict(), "bare": bare.as_dict(),
        "bare_phases": bare_times, "flagsim_s": flagsim_s, "bare_s": bare.wall_s,
        "flagsim_rate": n / flagsim_s, "bare_rate": n / bare.wall_s,
        "throughput_ratio": bare.wall_s / flagsim_s,
        "flagsim_cpu_s": flagsim_cpu, "bare_cpu_s": bare.cpu_s,
        "cpu_ratio": bare.cpu_s / flagsim_cpu if flagsim_cpu > 0 else None,
        "max_load": max(idx.load_before, idx.load_after, nb.load_after, bare.load_after),
        "search_ratio": bare_times["search_s"] / nb.wall_s,
        # the steady state: rate of part completion (from the second part on) over the bare
        # script's search rate (its search phase alone, after training and adding)
        "steady": steady, "bare_search_rate": n / bare_times["search_s"],
        "steady_ratio": (steady["rate"] / (n / bare_times["search_s"])
                         if steady.get("rate") else None),
        "flagsim_recall": flagsim_recall, "bare_recall": bare_recall,
        "index_file_mib": (faiss_file.get("size") or 0) / 2**20 or None,
        # the neighbours driver never loads the index (the search actors map it), so all of
        # its peak is "beyond the index"; subtracting the file size went negative at 1M
        "driver_beyond_index_mib": nb.peak_driver_mib,
        "measured": True,
    }


def part_times(run: Path) -> list[tuple[float, int]]:
    """(completion time, queries) of each neighbour-table part, in completion order: the mtime
    of its completion marker (written after the part's atomic rename)."""
    folder = run / "_meta" / "neighbours" / f"model={MODEL}" / "parts"
    out = []
    for path in folder.glob("*.json"):
        marker = _json(path) or {}
        out.append((path.stat().st_mtime, int(marker.get("queries") or 0)))
    return sorted(out)


def steady_state(run: Path, wall_s: float) -> dict[str, Any]:
    """The neighbours job's steady rate (queries/s) as figure 1 measures the pipeline's: the
    least-squares slope of part completion time against queries done, from the second part on
    (the first carries the job's start); fixed cost = wall time - queries / steady rate."""
    parts = part_times(run)
    if len(parts) < 3:
        return {"parts": len(parts), "rate": None, "fixed_s": None}
    done = np.cumsum([q for _, q in parts])[1:].astype(float)
    times = np.array([t for t, _ in parts][1:])
    slope = float(np.polyfit(done, times, 1)[0])
    if slope <= 0:
        return {"parts": len(parts), "rate": None, "fixed_s": None}
    rate = 1.0 / slope
    total = float(sum(q for _, q in parts))
    return {"parts": len(parts), "rate": rate, "fixed_s": wall_s - total / rate}


# --- fitting and projecting -------------------------------------------------------------------


def loglog_slope(ns: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """(slope b, intercept a) of log y = a + b log N by least squares; None under two sizes."""
    if len(ns) < 2 or len(set(ns)) < 2:
        return None
    b, a = np.polyfit(np.log(np.asarray(ns, float)), np.log(np.asarray(ys, float)), 1)
    return float(b), float(a)


def predict(points: Sequence[tuple[int, float]], n: int, kind: str) -> tuple[float, float, bool] | None:
    """(predicted value at n, slope, slope fitted?) from measured (N, value) points."""
    if not points:
        return None
    fit = loglog_slope([p[0] for p in points], [p[1] for p in points])
    if fit is not None:
        b, a = fit
        return math.exp(a + b * math.log(n)), b, True
    n0, y0 = points[-1]
    b = ASSUMED_SLOPE[kind]
    return y0 * (n / n0) ** b, b, False


@dataclass
class Budget:
    case_s: float
    total_s: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.started)


# --- the figure --------------------------------------------------------------------------------


def run(sizes: Sequence[tuple[int, Sequence[int]]] | None = None, quick: bool = False,
        case_s: float | None = None, total_s: float | None = None,
        workdir: str | None = None, n_clusters: int | None = None,
        sample_size: int = 1000) -> Figure:
    """Figure 8 (see the module docstring); `sizes` overrides FLAGSIM_BENCH_SEARCH."""
    if sizes is None:
        sizes = parse_sizes(os.environ.get("FLAGSIM_BENCH_SEARCH")
                            or (QUICK_SIZES if quick else DEFAULT_SIZES))
    budget = Budget(case_s if case_s is not None else float(os.environ.get(
        "FLAGSIM_BENCH_SEARCH_CASE_S", 600)), total_s if total_s is not None else float(
        os.environ.get("FLAGSIM_BENCH_SEARCH_BUDGET_S", 1800)))
    if n_clusters is None:
        n_clusters = int(os.environ.get("FLAGSIM_BENCH_SEARCH_CLUSTERS") or
                         (QUICK_CLUSTERS if quick else CLUSTERS))
    fig = Figure("search_scale", "8. Neighbour table at scale: flagsim CLI vs bare FAISS")
    keep = workdir or os.environ.get("FLAGSIM_BENCH_SEARCH_DIR")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="flagsim-bench-search-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    setup: list[dict[str, Any]] = []
    import faiss

    fig.raw.update(sizes=[[d, list(ns)] for d, ns in sizes], k=K, sample=sample_size,
                   n_clusters=n_clusters, case_budget_s=budget.case_s, budget_s=budget.total_s,
                   faiss_threads=faiss.omp_get_max_threads(), cpu_count=os.cpu_count(),
                   shard_rows=shard_rows(), ray=ray_mode())
    try:
        head = running_ray(root) if fig.raw["ray"] == "running" else contextlib.nullcontext()
        with head as ray_head:
            _sizes(sizes, budget, n_clusters, sample_size, root, rows, setup, ray_head)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    fig.raw["setup"] = setup
    fig.raw["rows"] = rows
    _project(rows)
    _tables(fig, rows, setup)
    return fig


def _sizes(sizes: Sequence[tuple[int, Sequence[int]]], budget: Budget,
           n_clusters: int, sample_size: int, root: Path, rows: list[dict[str, Any]],
           setup: list[dict[str, Any]], ray_head: RayHead | None) -> None:
    """Measure each size in turn while the budget allows (the others are projected later)."""
    for d, ns in sizes:
        gen = Clusters(d, n_clusters=n_clusters)
        for n in ns:
            todo = []
            for kind in kinds_to_run():
                done = _points(rows, d, kind)
                guess = predict(done, n, kind)
                if guess is None or (guess[0] <= budget.case_s and guess[0] <= budget.left()):
                    todo.append(kind)
                else:
                    rows.append({"n": n, "d": d, "kind": kind, "measured": False,
                                 "skipped_because": f"predicted {guess[0]:.0f} s for flagsim + "
                                 f"bare (slope {guess[1]:.2f}) over the case budget "
                                 f"{budget.case_s:.0f} s or the {max(budget.left(), 0):.0f} s left"})
            if todo:
                rows.extend(_one_size(root, gen, n, todo, sample_size, setup, ray_head))


def _points(rows: Sequence[dict[str, Any]], d: int, kind: str) -> list[tuple[int, float]]:
    """Measured (N, flagsim + bare seconds) of `kind` at `d`; when none, those of the nearest
    other d scaled by d / d' (the cost of both index kinds is linear in d)."""
    got = [r for r in rows if r["measured"] and r["kind"] == kind]
    same = [(r["n"], r["flagsim_s"] + r["bare_s"]) for r in got if r["d"] == d]
    if same or not got:
        return same
    other = min({r["d"] for r in got}, key=lambda x: abs(x - d))
    return [(r["n"], (r["flagsim_s"] + r["bare_s"]) * d / other) for r in got if r["d"] == other]


def _one_size(root: Path, gen: Clusters, n: int, kinds: Sequence[str], sample_size: int,
              setup: list[dict[str, Any]], ray_head: RayHead | None = None) -> list[dict[str, Any]]:
    work = root / f"d{gen.d}-n{n}"
    src, run = work / "source", work / "run"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = write_parquet(src, gen, n)
    gen_s = time.perf_counter() - t0
    imp = _checked(measure(flagsim_cmd(
        "import-embeddings", str(src), "--model", MODEL, "--run", str(run), "--id-column", "id",
        "--name-column", "name", "--vector-column", "vector",
        "--shard-size", str(shard_rows())), _env()), "flagsim import-embeddings")
    sample = sample_rows(n, sample_size)
    t0 = time.perf_counter()
    exact = exact_topk(gen, n, sample)
    setup.append({"n": n, "d": gen.d, "generate_s": gen_s, "parquet_mib": nbytes / 2**20,
                  "import": imp.as_dict(), "exact_sample_s": time.perf_counter() - t0})
    out = []
    try:
        for kind in kinds:
            log.info("search_scale: d=%d N=%d %s", gen.d, n, kind)
            out.append(run_kind(run, src, gen, n, kind, exact, sample, work, ray_head))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def kinds_to_run() -> tuple[str, ...]:
    """The index kinds measured (FLAGSIM_BENCH_SEARCH_KINDS, e.g. `approx`; default both), so a
    large size can be run for one kind alone in an invocation of its own."""
    want = tuple(k.strip() for k in os.environ.get("FLAGSIM_BENCH_SEARCH_KINDS", "").split(",")
                 if k.strip())
    bad = [k for k in want if k not in KINDS]
    if bad:
        raise ValueError(f"FLAGSIM_BENCH_SEARCH_KINDS: unknown kind(s) {bad}; valid: {', '.join(KINDS)}")
    return want or KINDS


def shard_rows() -> int:
    """Rows per imported shard (FLAGSIM_BENCH_SEARCH_SHARD, default 10,000: the size
    docs/cluster.md suggests), fixed over N so that what the driver holds per shard does not grow."""
    return int(os.environ.get("FLAGSIM_BENCH_SEARCH_SHARD") or 10_000)


def _project(rows: list[dict[str, Any]]) -> None:
    """Fill each unmeasured row with values projected from the measured sizes of its d and kind."""
    for r in rows:
        if r["measured"]:
            continue
        same = [x for x in rows if x["measured"] and x["d"] == r["d"] and x["kind"] == r["kind"]]
        for key in ("flagsim_s", "bare_s"):
            guess = predict([(x["n"], x[key]) for x in same], r["n"], r["kind"])
            if guess is not None:
                r[key], r[f"{key}_slope"], r[f"{key}_fitted"] = guess


def growth(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fitted log-log slope of wall time over N, per d, kind and system (measured sizes)."""
    out = []
    for d in sorted({r["d"] for r in rows}):
        for kind in KINDS:
            got = [r for r in rows if r["measured"] and r["d"] == d and r["kind"] == kind]
            modes = sorted({r.get("ray", "embedded") for r in got}) or ["embedded"]
            systems = [("flagsim_s", "flagsim", m) for m in modes] + [("bare_s", "bare FAISS", None)]
            for key, who, mode in systems:
                same = [r for r in got if mode is None or r.get("ray", "embedded") == mode]
                fit = loglog_slope([r["n"] for r in same], [r[key] for r in same])
                if mode == "running":
                    who += " (running Ray)"
                out.append({"d": d, "kind": kind, "system": who, "sizes": [r["n"] for r in same],
                            "slope": None if fit is None else fit[0]})
    return out


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def _steady_cell(r: dict[str, Any]) -> str:
    steady = r.get("steady") or {}
    if r.get("steady_ratio") is None:
        return "n/a"
    return f"{r['steady_ratio']:.2f} ({fmt(steady.get('fixed_s'))})"


def _driver_cell(m: dict[str, Any]) -> str:
    """All (VmHWM) / private (RssAnon) / object store (RssShmem) peaks, when sampled."""
    if not m.get("peak_driver_anon_mib"):
        return _mib(m["peak_driver_mib"])
    return (f"{_mib(m['peak_driver_mib'])} / {_mib(m['peak_driver_anon_mib'])} / "
            f"{_mib(m.get('peak_driver_shmem_mib'))}")


def _tables(fig: Figure, rows: list[dict[str, Any]], setup: list[dict[str, Any]]) -> None:
    t = Table(["d", "N", "index", "flagsim s (index + neighbours)", "bare FAISS s",
               "flagsim / bare throughput (CPU-time ratio)",
               "neighbours steady state / bare search (fixed cost s)", "load avg",
               "recall@10 flagsim / bare (manifest)",
               "driver peak MiB (neighbours: all / private / object store; index build)",
               "process tree peak MiB",
               "index file MiB"],
              caption=f"top-{K} of every vector, itself excluded; recall@10 on a fixed sample of "
                      f"{fig.raw['sample']} queries against exact brute force; "
                      f"{fig.raw['faiss_threads']} FAISS threads; 'projected' rows are not "
                      "measured (wall time from the fitted slope of the measured sizes).")
    for r in sorted(rows, key=lambda r: (r["d"], KINDS.index(r["kind"]), r["n"])):
        if r["measured"]:
            label = r["index_kind"] + (f" {r['factory']}, nprobe {r['params'].get('nprobe')}"
                                       if r["params"].get("nprobe") else "")
            if r.get("ray") == "running":
                label += " (running Ray)"
            mr = r.get("manifest_recall")
            t.rows.append([r["d"], fmt(r["n"]), label, fmt(r["flagsim_s"]), fmt(r["bare_s"]),
                           f"{r['throughput_ratio']:.2f} ({fmt(r['cpu_ratio'], 2)})",
                           _steady_cell(r), f"{r['max_load']:.1f}",
                           f"{r['flagsim_recall']:.3f} / {r['bare_recall']:.3f}"
                           + (f" ({mr:.3f})" if mr is not None else ""),
                           f"{_driver_cell(r['neighbours'])}; "
                           f"{_mib(r['index']['peak_driver_mib'])}",
                           f"{_mib(max(r['neighbours']['peak_tree_mib'], r['index']['peak_tree_mib']))}",
                           _mib(r["index_file_mib"])])
        else:
            how = ("slope fitted" if r.get("flagsim_s_fitted") else "slope assumed")
            t.rows.append([r["d"], fmt(r["n"]), ("exact" if r["kind"] == "flat" else "approximate")
                           + f" (projected, {how})", fmt(r.get("flagsim_s")), fmt(r.get("bare_s")),
                           "projected", "", "", "not measured", "not measured", "not measured",
                           "n/a"])
    fig.tables.append(t)
    g = Table(["d", "index", "system", "sizes measured", "wall time ∝ N^b, b ="],
              caption="Cost growth: least-squares slope of log(wall time) on log(N) over the "
                      "measured sizes (import and data generation excluded).")
    fig.raw["growth"] = growth(rows)
    for x in fig.raw["growth"]:
        g.rows.append([x["d"], x["kind"], x["system"], ", ".join(fmt(n) for n in x["sizes"]) or "none",
                       "n/a (under two sizes)" if x["slope"] is None else f"{x['slope']:.2f}"])
    fig.tables.append(g)
    s = Table(["d", "N", "generate s", "Parquet MiB", "import s", "import driver peak MiB",
               "exact recall sample s"], caption="Set-up per size (not part of the comparison).")
    for x in setup:
        s.rows.append([x["d"], fmt(x["n"]), fmt(x["generate_s"]), _mib(x["parquet_mib"]),
                       fmt(x["import"]["wall_s"]), _mib(x["import"]["peak_driver_mib"]),
                       fmt(x["exact_sample_s"])])
    fig.tables.append(s)
    v = verdicts(rows)
    fig.raw["verdicts"] = v
    fig.notes += [
        f"{T.SEARCH_THROUGHPUT.text} (at equal recall: recall@10 within "
        f"{EQUAL_RECALL:g}): worst measured {fmt(v['throughput_worst'])} -> {v['throughput']}.",
        f"{T.SEARCH_STEADY.text}: worst measured {fmt(v['steady_worst'])} -> {v['steady']} "
        "(parts completed per second from the second part on, over the bare script's search "
        "phase; the fixed cost is the neighbours wall time minus N over that rate: Python and "
        "Ray start, the job's planning, the actor's start and index load, the first part).",
                f"{T.SEARCH_RECALL.text}: lowest measured {fmt(v['recall_worst'])} -> {v['recall']}.",
        f"{T.SEARCH_DRIVER_MEMORY.text}: {fmt(v['driver_ratio'])} -> {v['driver']} "
        "(driver peak RSS of `flagsim neighbours`, per d and kind: the driver holds no index, "
        "the search actors map it). "
        f"{T.SEARCH_DRIVER_PRIVATE.text}: {fmt(v['private_ratio'])} -> {v['private']} (RssAnon, "
        "sampled: the driver's own memory; the rest of its RSS is shared libraries and the "
        "object-store pages it maps (RssShmem), which the job's `neighbours.buffer_mb` bounds).",
        "Data: a seeded mixture of "
        f"{fig.raw['n_clusters']} Gaussian clusters on the unit sphere, generated in "
        f"{CHUNK:,}-row chunks (a smaller N is a prefix of a larger one), written as Parquet and "
        "imported with `flagsim import-embeddings`. flagsim runs as subprocesses "
        "(`flagsim index --force`, `flagsim neighbours -k 10`, the same `--set index.*` for both);"
        " the approximate row is `index.kind=auto` with `index.exact_max_rows=1`, so the kind, "
        "nlist and nprobe are flagsim's automatic choice. The bare script (`bench/search_bare.py`)"
        " reads the same Parquet, uses the factory string and nprobe of flagsim's index manifest "
        "and the same training-sample size, and saves top-10 positions to .npy (flagsim writes a "
        "Parquet table).",
        "Memory: psutil samples every 0.1 s of the subprocess and the sum over it and all its "
        "descendants (an embedded Ray's GCS, raylet and workers); the driver's peak is its kernel "
        "high-water mark (VmHWM). Shared object-store pages count once per process mapping them. "
        f"Embeddings are imported in shards of {fig.raw['shard_rows']:,} rows.",
        "CPU-time ratio: bare CPU seconds over flagsim's (index + neighbours, every process of "
        "the tree); on a machine shared with other work (load avg above the core count) it is "
        "steadier than the wall-time ratio the target is stated in.",
    ]
    if any(r.get("ray") == "running" for r in rows):
        fig.notes.append(
            "Ray: rows marked (running Ray) ran `flagsim index` and `flagsim neighbours` against "
            "one local Ray head started for the figure (`ray start --head --block`, RAY_ADDRESS),"
            " as on a cluster that takes `ray job submit`: no Ray start or stop per command; that"
            " head's processes count in the process tree (memory, and CPU from the command's "
            "start). The other rows start an embedded local Ray in each `flagsim neighbours`.")
    if any(not r["measured"] for r in rows):
        fig.notes.append("Projected rows were not run on this machine: their wall times are "
                         "extrapolated from the measured sizes of the same d and index (slope as "
                         "in the growth table; 2 for exact and 1.5 for IVF when only one size was "
                         "measured) and carry no recall or memory figure.")


EQUAL_RECALL = 0.01


def verdicts(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The three targets' values and verdicts over the measured rows."""
    got = [r for r in rows if r["measured"]]
    equal = [r for r in got if abs(r["flagsim_recall"] - r["bare_recall"]) <= EQUAL_RECALL]
    thr = min((r["throughput_ratio"] for r in equal), default=None)
    approx = [r["flagsim_recall"] for r in got if r["kind"] == "approx"]
    rec = min(approx, default=None)
    ratios = []
    for d in {r["d"] for r in got}:
        for kind in KINDS:
            same = sorted((r for r in got if r["d"] == d and r["kind"] == kind), key=lambda r: r["n"])
            if len(same) >= 2 and same[0]["driver_beyond_index_mib"] > 0:
                ratios.append(same[-1]["driver_beyond_index_mib"] / same[0]["driver_beyond_index_mib"])
    drv = max(ratios, default=None)
    private = []
    for d in {r["d"] for r in got}:
        for kind in KINDS:
            same = sorted((r for r in got if r["d"] == d and r["kind"] == kind
                           and r["neighbours"].get("peak_driver_anon_mib")), key=lambda r: r["n"])
            if len(same) >= 2:
                private.append(same[-1]["neighbours"]["peak_driver_anon_mib"]
                               / same[0]["neighbours"]["peak_driver_anon_mib"])
    prv = max(private, default=None)
    steady = min((r["steady_ratio"] for r in equal if r.get("steady_ratio") is not None),
                 default=None)
    return {
        "steady_worst": steady, "steady": T.SEARCH_STEADY.verdict(steady),
        "private_ratio": prv, "private": T.SEARCH_DRIVER_PRIVATE.verdict(prv),
        "throughput_worst": thr, "throughput": T.SEARCH_THROUGHPUT.verdict(thr),
        "unequal_recall_rows": len(got) - len(equal),
        "recall_worst": rec, "recall": T.SEARCH_RECALL.verdict(rec),
        "driver_ratio": drv, "driver": T.SEARCH_DRIVER_MEMORY.verdict(drv),
    }


def summary_rows(fig: dict[str, Any]) -> list[list[str]]:
    """The summary table's rows of figure 8 (bench/report.py)."""
    v = fig["raw"]["verdicts"]
    return [
        ["8", "neighbour table: flagsim / bare FAISS throughput at equal recall (worst size)",
         T.SEARCH_THROUGHPUT.text, fmt(v["throughput_worst"]), v["throughput"]],
        ["8", "neighbours job steady state / bare FAISS search (worst size)",
         T.SEARCH_STEADY.text, fmt(v.get("steady_worst")), v.get("steady", "n/a")],
        ["8", "recall@10 of the automatically chosen approximate index (lowest size)",
         T.SEARCH_RECALL.text, fmt(v["recall_worst"]), v["recall"]],
        ["8", "neighbours driver peak RSS, largest / smallest N", T.SEARCH_DRIVER_MEMORY.text,
         fmt(v["driver_ratio"]), v["driver"]],
        ["8", "neighbours driver private memory, largest / smallest N",
         T.SEARCH_DRIVER_PRIVATE.text, fmt(v.get("private_ratio")), v.get("private", "n/a")],
    ]


# --- combining invocations ----------------------------------------------------------------------

PRIVATE_KEYS = ("cmd", "stderr_tail")  # local paths and log tails: kept out of committed numbers


def combine(figures: Sequence[dict[str, Any]]) -> Figure:
    """One figure from the rows of several runs of this one (e.g. a large size measured for one
    kind in an invocation of its own): measured rows are all kept, a projected row only where
    no run measured that (d, N, kind); projections are redone over the measured rows together.
    Each measured process's command line and stderr tail are dropped."""
    if not figures:
        raise ValueError("combine: no figures given")
    measured = [_public(r) for f in figures for r in f["raw"]["rows"] if r["measured"]]
    for r in measured:  # today's definition (runs before it subtracted the index file size)
        r["driver_beyond_index_mib"] = r["neighbours"]["peak_driver_mib"]
    have = {(r["d"], r["n"], r["kind"]) for r in measured}
    rows = list(measured)
    for f in figures:
        for r in f["raw"]["rows"]:
            key = (r["d"], r["n"], r["kind"])
            if not r["measured"] and key not in have:
                rows.append({k: r[k] for k in ("n", "d", "kind", "measured", "skipped_because")})
                have.add(key)
    fig = Figure("search_scale", figures[0].get("title", "search_scale"))
    first = figures[0]["raw"]
    fig.raw.update({k: first[k] for k in ("k", "sample", "n_clusters", "faiss_threads",
                                          "cpu_count", "shard_rows")})
    setup = [_public(s) for f in figures for s in f["raw"]["setup"]]
    fig.raw.update(setup=setup, rows=rows, combined_from=len(figures))
    _project(rows)
    _tables(fig, rows, setup)
    return fig


def _public(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if k not in PRIVATE_KEYS}
    if isinstance(x, list):
        return [_public(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.search_scale --combine A.json B.json --md OUT.md --json OUT.json`: the
    search_scale figures of several `bench.run --json` files rendered as one."""
    import argparse

    from bench.report import table_md

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--combine", nargs="+", required=True, type=Path)
    p.add_argument("--md", required=True, type=Path)
    p.add_argument("--json", required=True, type=Path)
    a = p.parse_args(argv)
    figs = [json.loads(x.read_text(encoding="utf-8"))["figures"]["search_scale"] for x in a.combine]
    fig = combine(figs)
    lines: list[str] = []
    for t in fig.tables:
        lines += table_md(t.__dict__)
    lines += [f"- {n}" for n in fig.notes]
    a.md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    a.json.write_text(json.dumps(fig.as_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
