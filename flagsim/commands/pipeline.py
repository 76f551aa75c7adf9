"""`flagsim pipeline`: the whole job (embed, index, neighbours, dedup, report) in one command."""

from __future__ import annotations

import argparse

from flagsim.app import options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pipeline",
        help="embed, index, neighbour tables and report in one go (what `make embed-all` runs)",
        description="Run flagsim embed, index, neighbours, dedup (the models with a calibrated "
        "threshold) and report on one run directory. "
        "Every stage skips what is already up to date, so rerunning resumes. A neighbours.k or "
        "report.k larger than the collection allows (images - 1) is lowered to it, with a warning.",
    )
    options.add_run_options(p, models="models (default: the config's)", deprecated_out=True)
    options.add_embed_args(p, "redo every stage")
    p.add_argument("--no-report", action="store_true",
                   help="stop before the report (after the neighbour and dedup tables)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from flagsim.app import stages
    from flagsim.console import safe, stdout_console
    from flagsim.pipeline.embed import print_summary

    job = stages.prepare(args, images=args.images)
    result = stages.pipeline(
        job.cfg, run_dir=job.run_dir, images=args.images, models=list(job.models),
        force=args.force, report=not args.no_report, show_progress=not args.no_progress,
    )
    print_summary(result.embed)
    console = stdout_console()
    for n in result.neighbours:
        console.print(f"neighbours {safe(n.model)}: top-{n.k} of {n.queries} images -> {safe(n.path)}")
    if result.report is not None:
        console.print(f"report -> {safe(result.report.html)}")
    return 0
