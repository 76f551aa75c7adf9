"""Ray job: the whole run, embed -> index -> neighbours -> report, in one submission.

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/pipeline.py --config configs/cluster-gpu.yaml [--out s3://bucket/run]

Wraps flagsim.pipeline.run.run_pipeline (what `flagsim pipeline` runs): embedding streams
through the cluster's actor pools; index, neighbour tables and report are built by the job's
driver (submit with `--entrypoint-num-gpus 1` to place it on a GPU node). The separate jobs
build_index.py and neighbours.py instead run one Ray task per model anywhere in the cluster.
Every stage resumes: finished shards, fresh indexes and written tables are kept.
"""

from __future__ import annotations

import argparse
import logging

import _common
import _stages

log = logging.getLogger("flagsim.jobs.pipeline")
PROG = "jobs/pipeline.py"


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser(PROG, "Embed, index, neighbours and report for one run directory.")
    p.add_argument("--images", metavar="TABLE",
                   help="images table (.parquet or a run directory, path or URI) to embed")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--no-report", action="store_true", help="stop after the neighbour tables")
    return p


def run(args: argparse.Namespace) -> int:
    job = _common.load_job(args)
    if args.images:
        _common.check_input(args.images, "images table")
    _common.connect(job)

    from flagsim.pipeline.run import run_pipeline

    result = run_pipeline(
        job.cfg, run_dir=job.run_dir, images=args.images, models=list(job.models),
        force=args.force, report=not args.no_report, show_progress=False,
    )
    _stages.log_embed_summary(result.embed)
    for n in result.neighbours:
        log.info("neighbours %s: top-%d of %d images, %d rows -> %s", n.model, n.k, n.queries,
                 n.rows, n.path)
    if result.report is not None:
        log.info("report -> %s", result.report.html)
    return 1 if any(r.status == "failed" for r in result.embed.results) else 0


if __name__ == "__main__":
    _common.main(PROG, build_parser(), run)
