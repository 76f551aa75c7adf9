"""Ray job: build (or keep, when fresh) the FAISS cosine index of each embedded model.

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/build_index.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

One Ray task per model, on a GPU when index.use_gpu allows and the cluster has one.
"""

from __future__ import annotations

import argparse

import _common
import _stages

PROG = "jobs/build_index.py"


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser(PROG, "Build the FAISS index of every embedded model (one Ray task each).")
    p.add_argument("--force", action="store_true", help="rebuild even when an index is fresh")
    return p


def run(args: argparse.Namespace) -> int:
    job = _common.load_job(args)
    _common.check_input(job.run_dir, "run directory")
    resources = _common.connect(job, embed_models=())
    _stages.index_stage(job, resources, force=args.force)
    return 0


if __name__ == "__main__":
    _common.main(PROG, build_parser(), run)
