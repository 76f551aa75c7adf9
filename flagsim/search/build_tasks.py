"""Index builds on Ray: one task per table that needs one, each reserving CPUs, a GPU and memory.

Every command that builds indexes while it uses Ray (`flagsim pipeline`, `neighbours`, `search`,
the jobs in jobs/, and `flagsim index` connected to a cluster) builds them here, so no driver
ever holds an index it builds: the driver checks freshness from the manifests and submits the
builds, the tasks read the shards and write the index files (the run directory must be
reachable from every node, as for the neighbours job).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flagsim.config import Config, IndexConfig
from flagsim.errors import ConfigError, DataError, FlagsimError
from flagsim.rundir import RunDir
from flagsim.search.catalog import ENSEMBLE, complete_models
from flagsim.search.manifest import IndexManifest, read_index_manifest
from flagsim.search.saved import index_state
from flagsim.shards import read_manifest

log = logging.getLogger(__name__)

#: a table whose index is built: a model, or `all` with the ensemble's models (empty: every
#: complete model of the run)
Table = tuple[str, tuple[str, ...]]

#: memory a build task's worker holds besides the build: Python, Ray, FAISS, pyarrow, numpy
TASK_BASE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class IndexBuild:
    """One table's saved index after `ensure_indexes`, and what was done to it."""

    model: str
    status: str  # "built" (was missing, or --force), "rebuilt" (was stale) or "up to date"
    manifest: IndexManifest


def ensure_indexes(
    run_dir: str | RunDir, tables: Sequence[Table], cfg: Config, *, on_ray: bool,
    force: bool = False, on_settings: bool = True, verify: bool = False,
) -> list[IndexBuild]:
    """The saved index of every table, in order, built first where missing or stale (every one
    with `force`).

    Stale is `index_state`'s verdict (with `cfg.index`'s settings when `on_settings`, with the
    files' sha256 when `verify`). With `on_ray` the builds run as Ray tasks, all at once, on the
    session of `ensure_ray(cfg)` (started only when there is something to build), and every
    task is waited for before the first failure is raised, so the builds that succeed are kept;
    without, one after another in this process, stopping at the first failure.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.at(run_dir)
    status: dict[str, str] = {}
    todo: list[Table] = []
    for model, members in tables:
        if force:  # rebuilt whatever its state: no need to hash what is replaced
            status[model] = "built"
            todo.append((model, members))
            continue
        state, reason = index_state(run, model, cfg.index if on_settings else None,
                                    verify=verify, models=list(members) or None)
        if state == "fresh":
            status[model] = "up to date"
            continue
        if state == "stale":
            log.info("%s; rebuilding", reason)
        status[model] = "built" if state == "missing" else "rebuilt"
        todo.append((model, members))
    if todo and on_ray:
        from flagsim.pipeline.ray_session import ensure_ray

        _run_tasks(run, todo, cfg, ensure_ray(cfg))
    elif todo:
        from flagsim.search.build import build_index

        for model, members in todo:
            build_index(run, model, cfg.index, models=list(members) or None)
    out = []
    for model, _ in tables:
        manifest = read_index_manifest(run, model)
        if manifest is None:
            raise DataError(f"no index of model {model} in {run.root} after building it")
        out.append(IndexBuild(model, status[model], manifest))
    return out


# --- the tasks' resources ----------------------------------------------------------------------

def task_gpus(cfg: Config, resources: dict[str, float]) -> float:
    """GPUs per index task: index.use_gpu, `auto` meaning "when the cluster has some"."""
    want = cfg.index.use_gpu
    if want == "no":
        return 0.0
    if resources.get("GPU", 0.0) < 1:
        if want == "yes":
            raise ConfigError("index.use_gpu is yes but the Ray cluster has no GPU")
        return 0.0
    return 1.0


def task_cpus(cluster_cpus: float, node_cpus: Sequence[float], tasks: int) -> int:
    """CPUs (and FAISS threads) per index task: an equal share of the cluster among `tasks`
    tasks run at once, at least 1 and at most the largest node's CPUs (a task runs on one node)."""
    share = int(cluster_cpus // max(tasks, 1))
    largest = int(max(node_cpus, default=cluster_cpus))
    return max(1, min(share, largest))


def task_memory(n: int, dim: int, index_cfg: IndexConfig, node_memory: Sequence[float]) -> int:
    """Bytes of memory an index task reserves: its build's peak (`build_peak_bytes`, within
    index.memory_budget_gb) and the worker's own, at most the most any eligible node has (so
    that the task can always be placed). Ray's `memory` is a reservation for its scheduler
    (it places no more builds on a node than their reservations fit), nothing is allocated."""
    from flagsim.search.choice import build_peak_bytes

    want = TASK_BASE_BYTES + build_peak_bytes(n, dim, index_cfg)
    largest = int(max(node_memory, default=0))
    return min(want, largest) if largest > 0 else want


def _nodes(with_gpu: bool) -> list[dict[str, float]]:
    """The resources of each live node (of each with a GPU when the task takes one: it runs there)."""
    import ray

    return [n.get("Resources", {}) for n in ray.nodes()
            if n.get("Alive") and (not with_gpu or n.get("Resources", {}).get("GPU", 0) >= 1)]


def node_cpus(with_gpu: bool) -> list[float]:
    """CPUs of each live node (of each with a GPU when `with_gpu`)."""
    return [float(r.get("CPU", 0)) for r in _nodes(with_gpu)]


def node_memory(with_gpu: bool, min_cpus: float = 0) -> list[float]:
    """Ray's `memory` resource (bytes) of each live node that has at least `min_cpus` CPUs (and
    a GPU when `with_gpu`): the nodes a task of that many CPUs can run on."""
    return [float(r.get("memory", 0)) for r in _nodes(with_gpu) if float(r.get("CPU", 0)) >= min_cpus]


def table_shape(run: RunDir, model: str, members: Sequence[str]) -> tuple[int, int]:
    """(rows, dim) of a table's vectors from the embedding manifests (the ensemble: at most its
    smallest model's rows, its models' dims summed), without reading a shard."""
    names = [model] if model != ENSEMBLE else (list(members) or complete_models(run))
    manifests = [read_manifest(run, m) for m in names]
    missing = [m for m, man in zip(names, manifests, strict=True) if man is None]
    if missing:
        raise DataError(f"no embeddings for model {missing[0]} in {run.root}")
    return (min(int(m.rows) for m in manifests if m is not None),
            sum(int(m.dim) for m in manifests if m is not None))


# --- the tasks ---------------------------------------------------------------------------------

class _Warnings(logging.Handler):
    """Collects the warnings flagsim logs in a task: a worker's log never reaches the console."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def build_task(run_uri: str, model: str, members: Sequence[str], index_cfg: IndexConfig,
               threads: int) -> dict[str, Any]:
    """One Ray task: build and save the index of a table; its manifest, and under `warnings`
    what the build warned about (the driver logs them)."""
    from flagsim.search.backend import set_threads
    from flagsim.search.build import build_index

    set_threads(threads)  # Ray starts a task with OMP_NUM_THREADS = its num_cpus
    warnings = _Warnings()
    root = logging.getLogger("flagsim")
    root.addHandler(warnings)
    try:
        manifest = build_index(run_uri, model, index_cfg, models=list(members) or None).manifest
    finally:
        root.removeHandler(warnings)
    return {"manifest": manifest.to_json(), "warnings": warnings.lines}


def task_name(model: str) -> str:
    """The name of a table's build task: in Ray's task list, and its worker's process title
    (`ray::flagsim-index-<model>`) while it runs."""
    return f"flagsim-index-{model}"


def _run_tasks(run: RunDir, todo: Sequence[Table], cfg: Config, resources: dict[str, float]) -> None:
    import ray

    gpus = task_gpus(cfg, resources)
    cpus = task_cpus(resources.get("CPU", 1.0), node_cpus(gpus > 0), len(todo))
    memory = node_memory(gpus > 0, min_cpus=cpus)  # the nodes that have that many CPUs
    # every table's reservation first (a config error or a missing model fails here, before any
    # task is submitted), then all the tasks at once
    reserve = {model: task_memory(*table_shape(run, model, members), cfg.index, memory)
               for model, members in todo}
    refs = {}
    for model, members in todo:
        log.info("%s: building its index in a Ray task (%d CPU, %g GPU, %.2f GiB)", model, cpus,
                 gpus, reserve[model] / 2**30)
        remote = ray.remote(build_task).options(num_cpus=cpus, num_gpus=gpus,
                                                memory=reserve[model], max_retries=1,
                                                name=task_name(model))
        refs[model] = remote.remote(str(run.root), model, list(members), cfg.index, cpus)
    errors: list[BaseException] = []
    for model, ref in refs.items():  # all of them, so that a failure keeps the others' indexes
        try:
            out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            errors.append(type(cause)(f"index {model}: {cause}") if isinstance(cause, FlagsimError)
                          else exc)
            continue
        except ray.exceptions.RayError as exc:  # the worker died (out of memory, killed), ...
            reason = " ".join(str(exc).split())[:300]
            errors.append(DataError(f"index {model}: its Ray task failed: {reason}"))
            continue
        for line in out["warnings"]:
            log.warning("%s", line)
        man = out["manifest"]
        log.info("%s: wrote %s (%s, %d vectors, recall %s, %.2fs on %s)", model,
                 run.index_path(model), man["kind"], man["count"], man.get("recall"),
                 man.get("build_seconds") or 0.0, man.get("device"))
    if errors:
        if len(errors) > 1:
            log.error("%d index builds failed; the first is raised", len(errors))
        raise errors[0]
