"""`flagsim pipeline`: the whole job (embed, index, neighbours, report) in one command."""

from __future__ import annotations

import argparse
import logging

from flagsim.commands.common import (
    add_config_args,
    config_from_args,
    run_dir_from,
    split_csv,
    with_values,
)
from flagsim.config import Config

log = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pipeline",
        help="embed, index, neighbour tables and report in one go (what `make embed-all` runs)",
        description="Run flagsim embed, index, neighbours and report on one run directory. "
        "Every stage skips what is already up to date, so rerunning resumes. A neighbours.k or "
        "report.k larger than the collection allows (images - 1) is lowered to it, with a warning.",
    )
    add_config_args(p)
    p.add_argument("--out", "--run", dest="run_dir", metavar="RUN_DIR",
                   help="run directory, path or URI (default: the config's run_dir)")
    p.add_argument("--images", metavar="TABLE", help="images table to embed (default: the run's)")
    p.add_argument("--models", type=split_csv, metavar="A,B", help="models (default: the config's)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--no-report", action="store_true", help="stop after the neighbour tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def fit_k(cfg: Config, images: int) -> Config:
    """`cfg` with neighbours.k and report.k lowered to `images - 1` where larger (a warning
    each), so that a small collection gets its neighbour tables and report; a collection of
    fewer than two images is refused before any work."""
    from flagsim.errors import DataError

    most = images - 1
    if most < 1:
        raise DataError(f"the collection has {images} image(s); neighbours need at least 2")
    lowered = {}
    for key, k in (("neighbours.k", cfg.neighbours.k), ("report.k", cfg.report.k)):
        if k > most:
            log.warning("%s=%d clamped to %d (the collection has %d images)", key, k, most, images)
            lowered[key] = most
    return with_values(cfg, lowered) if lowered else cfg


def run(args: argparse.Namespace) -> int:
    from flagsim.console import safe, stdout_console
    from flagsim.pipeline.embed import print_summary, resolve_images
    from flagsim.pipeline.run import run_pipeline
    from flagsim.rundir import RunDir

    cfg = config_from_args(args)
    run_dir = run_dir_from(args, cfg, writable=True)
    # The images table first (it becomes the run's own), so k is checked before any work.
    table = resolve_images(cfg, RunDir.at(run_dir), args.images)
    cfg = fit_k(cfg, table.num_rows)
    result = run_pipeline(
        cfg, run_dir=run_dir, images=None, models=args.models, force=args.force,
        report=not args.no_report, show_progress=not args.no_progress,
    )
    print_summary(result.embed)
    console = stdout_console()
    for n in result.neighbours:
        console.print(f"neighbours {safe(n.model)}: top-{n.k} of {n.queries} images -> {safe(n.path)}")
    if result.report is not None:
        console.print(f"report -> {safe(result.report.html)}")
    return 1 if any(r.status == "failed" for r in result.embed.results) else 0
