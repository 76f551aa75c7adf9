"""`flagsim pipeline`: embed -> index -> neighbours -> report for one run directory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from flagsim.config import Config
from flagsim.pipeline.embed import EmbedSummary, run_embed

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    embed: EmbedSummary
    indexed: list[str]
    neighbours: list
    report: object | None


def run_pipeline(
    cfg: Config,
    run_dir: str | None = None,
    images: str | None = None,
    models: Sequence[str] | None = None,
    force: bool = False,
    report: bool = True,
    show_progress: bool = True,
) -> PipelineResult:
    """Run every stage; each stage skips what is already up to date, so a rerun is cheap."""
    from flagsim.index import build_index, index_state
    from flagsim.neighbours import write_neighbours
    from flagsim.rundir import RunDir

    run_dir = run_dir or cfg.run_dir
    summary = run_embed(cfg, run_dir=run_dir, images=images, models=models, force=force,
                        show_progress=show_progress)
    ready = [r.model for r in summary.results if r.status in ("embedded", "up to date")]
    if not ready:
        log.warning("no model produced embeddings; nothing to index")
        return PipelineResult(summary, [], [], None)
    run = RunDir.at(run_dir)
    for m in ready:
        state, _ = index_state(run, m, cfg.index)
        if force or state != "fresh":
            build_index(run, m, cfg.index)
    neighbours = write_neighbours(run_dir, cfg.neighbours.k, ready, cfg)
    paths = None
    if report:
        from flagsim.report import build_report

        paths = build_report(
            run_dir, queries=None, k=cfg.report.k, pairs=cfg.report.pairs, models=ready,
            default_queries=cfg.report.queries,
        )
    return PipelineResult(summary, ready, neighbours, paths)
