"""Ray job: embed the run's images with every configured model into Parquet shards.

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/embed.py --config configs/cluster-gpu.yaml [--out s3://bucket/run]

Runs unchanged on a laptop (`python jobs/embed.py --config configs/default.yaml`): without
RAY_ADDRESS or ray.address it starts an embedded local Ray.
"""

from __future__ import annotations

import argparse

import _common
import _stages

PROG = "jobs/embed.py"


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser(PROG, "Embed every image with every model (Ray Data actor pools).")
    p.add_argument("--images", metavar="TABLE",
                   help="images table (.parquet or a run directory, path or URI) to embed")
    p.add_argument("--force", action="store_true", help="discard existing shards and redo")
    return p


def run(args: argparse.Namespace) -> int:
    job = _common.load_job(args)
    if args.images:
        _common.check_input(args.images, "images table")
    _common.connect(job)
    return _stages.embed_stage(job, images=args.images, force=args.force)


if __name__ == "__main__":
    _common.main(PROG, build_parser(), run)
