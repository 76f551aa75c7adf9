"""The stages the jobs run: embed (Ray Data actor pools), index and neighbours (a Ray task per model).

Index and neighbour tasks read and write the run directory themselves, so it must be reachable
from every node (an object-store URI or a shared filesystem); on one machine any path works.
"""

from __future__ import annotations

import logging
from typing import Any

from _common import Job

log = logging.getLogger("flagsim.jobs")


def _explicit_models(job: Job) -> list[str] | None:
    """The models named on the command line (None: every model the run has)."""
    return list(job.args.models) if getattr(job.args, "models", None) else None


# --- embed -------------------------------------------------------------------------------------

def embed_stage(job: Job, images: str | None = None, force: bool = False) -> int:
    """Embed with every model of the job; 0 when no model failed, else 1."""
    from flagsim.pipeline.embed import run_embed

    summary = run_embed(
        job.cfg, run_dir=job.run_dir, images=images, models=list(job.models), force=force,
        show_progress=False,
    )
    log_embed_summary(summary)
    return 1 if any(r.status == "failed" for r in summary.results) else 0


def log_embed_summary(summary) -> None:
    """One log line per model of an EmbedSummary (job logs are text, not a terminal table)."""
    for r in summary.results:
        log.info(
            "embed %s: %s, %d images, dim %s, %s/%s%s%s", r.model, r.status, r.images,
            r.dim or "-", r.device or "-", r.dtype or "-",
            f", {r.images_per_s:.1f} images/s" if r.images_per_s else "",
            f" ({r.reason})" if r.reason else "",
        )
    log.info("embeddings of %d images in %s (%d decode errors)", summary.images, summary.run_dir,
             summary.decode_errors)


# --- index and neighbours: one Ray task per model ----------------------------------------------

def _task_gpus(job: Job, resources: dict[str, float]) -> float:
    """GPUs per index/neighbour task: index.use_gpu, `auto` meaning "when the cluster has some"."""
    from flagsim.errors import ConfigError

    want = job.cfg.index.use_gpu
    if want == "no":
        return 0.0
    if resources.get("GPU", 0.0) < 1:
        if want == "yes":
            raise ConfigError("index.use_gpu is yes but the Ray cluster has no GPU")
        return 0.0
    return 1.0


def _run_per_model(job: Job, resources: dict[str, float], fn, models: list[str], what: str) -> list:
    """Run `fn(run_dir, model, cfg)` as one Ray task per model; results in model order."""
    import ray

    from flagsim.errors import FlagsimError

    gpus = _task_gpus(job, resources)
    remote = ray.remote(fn).options(num_cpus=1, num_gpus=gpus, max_retries=1,
                                    name=f"flagsim-{what}")
    refs = {m: remote.remote(job.run_dir, m, job.cfg) for m in models}
    out = []
    for m, ref in refs.items():
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, FlagsimError):
                raise type(cause)(f"{what} {m}: {cause}") from None
            raise
    return out


def index_stage(job: Job, resources: dict[str, float], force: bool = False) -> list[dict[str, Any]]:
    """Build (or keep, when fresh) the FAISS index of each model; return their manifests."""
    from flagsim.index import resolve_models
    from flagsim.rundir import RunDir

    models = resolve_models(RunDir.at(job.run_dir), _explicit_models(job))

    def build_one(run_dir: str, model: str, cfg) -> dict[str, Any]:
        from flagsim.index import build_index, load_index

        if force:
            idx = build_index(run_dir, model, cfg.index)
        else:
            idx = load_index(run_dir, model, cfg.index, rebuild_on_settings=True)
        return idx.manifest.to_json()

    manifests = _run_per_model(job, resources, build_one, models, "index")
    for m in manifests:
        log.info("index %s: %s (%s), %d x %d, recall %s, on %s", m["model"], m["kind"],
                 m["factory"], m["count"], m["dim"], m.get("recall"), m.get("device"))
    return manifests


def neighbours_stage(job: Job, resources: dict[str, float]) -> list[dict[str, Any]]:
    """Write the top-k neighbour table of every image for each model; return one summary each."""
    from flagsim.index import resolve_models
    from flagsim.rundir import RunDir

    models = resolve_models(RunDir.at(job.run_dir), _explicit_models(job))

    def neighbours_one(run_dir: str, model: str, cfg) -> dict[str, Any]:
        from dataclasses import asdict

        from flagsim.neighbours import write_neighbours

        (result,) = write_neighbours(run_dir, k=cfg.neighbours.k, models=[model], cfg=cfg)
        return asdict(result)

    results = _run_per_model(job, resources, neighbours_one, models, "neighbours")
    for r in results:
        log.info("neighbours %s: top-%d of %d images, %d rows (%s index) -> %s", r["model"], r["k"],
                 r["queries"], r["rows"], r["index_kind"], r["path"])
    return results
