"""`flagsim pipeline`: the whole job (embed, index, neighbours, report) in one command."""

from __future__ import annotations

import argparse
import sys

from flagsim.commands.common import add_config_args, config_from_args, run_dir_from, split_csv


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pipeline",
        help="embed, index, neighbour tables and report in one go (what `make embed-all` runs)",
        description="Run flagsim embed, index, neighbours and report on one run directory. "
        "Every stage skips what is already up to date, so rerunning resumes.",
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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from flagsim.pipeline.embed import print_summary
    from flagsim.pipeline.run import run_pipeline

    cfg = config_from_args(args)
    run_dir = run_dir_from(args, cfg, writable=True)
    result = run_pipeline(
        cfg, run_dir=run_dir, images=args.images, models=args.models, force=args.force,
        report=not args.no_report, show_progress=not args.no_progress,
    )
    print_summary(result.embed)
    console = Console(width=None if sys.stdout.isatty() else 140)
    for n in result.neighbours:
        console.print(f"neighbours {n.model}: top-{n.k} of {n.queries} images -> {n.path}")
    if result.report is not None:
        console.print(f"report -> {result.report.html}")
    return 1 if any(r.status == "failed" for r in result.embed.results) else 0
