"""The stages, run alike by `flagsim <command>` and jobs/: embed, index, neighbours, report, pipeline.

`prepare` loads and checks a job (config, models, resources, output) before Ray is imported.
The index stage runs one Ray task per model (`search/build_tasks.py`), in `pipeline` too; the
neighbours stage is a Ray Data job (`search/neighbours.py`). Both read and write the run
directory from the workers, so it must be reachable from every node (an object-store URI or a
shared filesystem).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from flagsim.app.checks import check_fit, check_input, check_models, check_output, check_resources
from flagsim.app.options import config_from_args, with_values
from flagsim.config import Config
from flagsim.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A checked job: its config (run_dir resolved), the models it works on, its arguments."""

    cfg: Config
    run_dir: str
    models: tuple[str, ...]
    explicit: list[str] | None  # the models named with --models (None: the run's or config's)
    args: argparse.Namespace


def prepare(args: argparse.Namespace, *, images: str | None = None, existing_run: bool = False) -> Job:
    """Load the config with its overrides and check it all before any work or Ray: --models,
    the resources the actor pools ask for, the output location, and the inputs named."""
    cfg = config_from_args(args)
    run_dir = getattr(args, "run_dir", None) or cfg.run_dir
    if run_dir != cfg.run_dir:
        cfg = cfg.model_copy(update={"run_dir": run_dir})
    explicit = list(args.models) if getattr(args, "models", None) else None
    if explicit and not existing_run:
        check_models(explicit)
    models = tuple(explicit or cfg.embed.models)
    check_resources(cfg, models)
    check_output(run_dir)
    if images:
        check_input(images, "images table")
    if existing_run:
        check_input(run_dir, "run directory")
        if explicit:  # the run's models, imported ones and `all` included (as the CLI takes them)
            from flagsim.rundir import RunDir
            from flagsim.search.catalog import ENSEMBLE, resolve_models

            models = tuple(resolve_models(RunDir.at(run_dir), explicit))
            explicit = [*models, *([ENSEMBLE] if ENSEMBLE in explicit else [])]
    return Job(cfg=cfg, run_dir=run_dir, models=models, explicit=explicit, args=args)


def connect(job: Job, embed_models: Sequence[str] | None = None) -> dict[str, float]:
    """Connect to Ray (RAY_ADDRESS, else ray.address, else an embedded local Ray); the actor
    pools of `embed_models` (default: the job's models) must fit it."""
    from flagsim.pipeline.ray_session import ensure_ray, ray_address

    resources = ensure_ray(job.cfg)
    check_fit(job.cfg, resources, job.models if embed_models is None else embed_models)
    log.info("Ray: %g CPUs, %g GPUs (%s)", resources.get("CPU", 0), resources.get("GPU", 0.0),
             ray_address(job.cfg) or "the local Ray")
    return resources


# --- embed -------------------------------------------------------------------------------------

def embed(job: Job, images: str | None = None, force: bool = False, repair: bool = False,
          show_progress: bool = False):
    """Embed the run's images with every model of the job; the EmbedSummary."""
    from flagsim.pipeline.embed import run_embed

    return run_embed(job.cfg, run_dir=job.run_dir, images=images, models=list(job.models),
                     force=force, repair_shards=repair, show_progress=show_progress)


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


# --- the whole run -----------------------------------------------------------------------------

@dataclass
class PipelineResult:
    embed: Any  # EmbedSummary
    indexed: list[str]
    neighbours: list
    report: object | None


def fit_k(cfg: Config, images: int) -> Config:
    """`cfg` with neighbours.k and report.k lowered to `images - 1` where larger (a warning
    each), so that a small collection gets its neighbour tables and report; a collection of
    fewer than two images is refused before any work."""
    most = images - 1
    if most < 1:
        raise DataError(f"the collection has {images} image(s); neighbours need at least 2")
    lowered = {}
    for key, k in (("neighbours.k", cfg.neighbours.k), ("report.k", cfg.report.k)):
        if k > most:
            log.warning("%s=%d clamped to %d (the collection has %d images)", key, k, most, images)
            lowered[key] = most
    return with_values(cfg, lowered) if lowered else cfg


def pipeline(
    cfg: Config,
    run_dir: str | None = None,
    images: str | None = None,
    models: Sequence[str] | None = None,
    force: bool = False,
    report: bool = True,
    show_progress: bool = True,
) -> PipelineResult:
    """Embed, index, neighbour tables, dedup tables (of the calibrated models) and report; each
    stage skips what is already up to date, so a rerun is cheap. The images table is settled
    first (it becomes the run's own), so that k is checked against the collection before any
    work."""
    from flagsim.pipeline.embed import resolve_images, run_embed
    from flagsim.rundir import RunDir
    from flagsim.search.build_tasks import ensure_indexes
    from flagsim.search.neighbours import write_neighbours

    run_dir = run_dir or cfg.run_dir
    run = RunDir.at(run_dir)
    cfg = fit_k(cfg, resolve_images(cfg, run, images).num_rows)
    summary = run_embed(cfg, run_dir=run_dir, images=None, models=models, force=force,
                        show_progress=show_progress)
    ready = [r.model for r in summary.results if r.status in ("embedded", "up to date")]
    if not ready:
        log.warning("no model produced embeddings; nothing to index")
        return PipelineResult(summary, [], [], None)
    from flagsim.search.catalog import ENSEMBLE

    tables = [*ready, ENSEMBLE] if len(ready) >= 2 else ready  # `all` beside the models
    # every index in one round of Ray tasks, the ensemble's beside the models'
    ensure_indexes(run, [(m, tuple(ready) if m == ENSEMBLE else ()) for m in tables], cfg,
                   on_ray=True, force=force)
    neighbours = write_neighbours(run_dir, cfg.neighbours.k, tables, cfg)
    _dedup_calibrated(run_dir, ready, cfg)
    paths = None
    if report:
        from flagsim.report import build_report

        paths = build_report(
            run_dir, queries=None, k=cfg.report.k, pairs=cfg.report.pairs, models=ready,
            default_queries=cfg.report.queries, map_max=cfg.report.map_max,
            thumbs_max=cfg.report.thumbs_max, projection=cfg.report.projection,
        )
    return PipelineResult(summary, ready, neighbours, paths)


def _dedup_calibrated(run_dir: str, models: Sequence[str], cfg: Config) -> None:
    """Near-duplicate groups of the models with a calibrated threshold (for the report)."""
    from flagsim.search.dedup import calibrated_threshold, write_dedup

    calibrated = [m for m in models if calibrated_threshold(m) is not None]
    if calibrated:
        write_dedup(run_dir, calibrated, None, cfg)


def log_pipeline(result: PipelineResult) -> None:
    log_embed_summary(result.embed)
    for n in result.neighbours:
        log.info("neighbours %s: top-%d of %d images, %d rows -> %s", n.model, n.k, n.queries,
                 n.rows, n.path)
    if result.report is not None:
        log.info("report -> %s", result.report.html)


# --- index: one Ray task per model; neighbours: the Ray Data job --------------------------

def index_tasks(job: Job, force: bool = False) -> list[dict[str, Any]]:
    """Build (or keep, when fresh) the FAISS index of each model and of their ensemble `all`,
    one Ray task each (`search/build_tasks.py`); their manifests."""
    from flagsim.rundir import RunDir
    from flagsim.search.build_tasks import ensure_indexes
    from flagsim.search.catalog import search_tables

    tables = search_tables(RunDir.at(job.run_dir), job.explicit)
    built = ensure_indexes(job.run_dir, tables, job.cfg, on_ray=True, force=force)
    for b in built:
        m = b.manifest
        log.info("index %s: %s, %s (%s), %d x %d, recall %s, on %s", m.model, b.status, m.kind,
                 m.factory, m.count, m.dim, m.recall, m.device)
    return [b.manifest.to_json() for b in built]


def neighbour_tables(job: Job) -> list[dict[str, Any]]:
    """Write the top-k neighbour table of every image for each model (and the ensemble `all`,
    see `write_neighbours`) with the neighbours Ray Data job; one summary each."""
    from flagsim.search.neighbours import write_neighbours

    results = [asdict(r) for r in write_neighbours(job.run_dir, job.cfg.neighbours.k,
                                                   job.explicit, job.cfg)]
    for r in results:
        log.info("neighbours %s: top-%d of %d images, %d rows, %d part(s) written (%s index, "
                 "recall %s) -> %s", r["model"], r["k"], r["queries"], r["rows"], r["written"],
                 r["index_kind"], r["recall"], r["path"])
    return results


def search_queries(job: Job, queries: str, out: str, k: int | None) -> list[dict[str, Any]]:
    """The batch query job (`flagsim.search.batch.run_search`); one summary per model."""
    from flagsim.search.batch import run_search

    results = [asdict(r) for r in run_search(job.run_dir, queries, out, job.explicit,
                                             k or job.cfg.neighbours.k, job.cfg, show_progress=False)]
    for r in results:
        log.info("search %s: top-%d of %d queries, %d part(s) written -> %s", r["model"], r["k"],
                 r["queries"], r["written"], r["path"])
    return results
