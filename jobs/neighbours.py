"""Ray job: the top-k neighbour table of every image, for each model (self excluded).

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/neighbours.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

One Ray task per model; a model without a fresh index gets one built first.
"""

from __future__ import annotations

import argparse

import _common
import _stages

PROG = "jobs/neighbours.py"


def build_parser() -> argparse.ArgumentParser:
    return _common.parser(PROG, "Write neighbours/model=<name>/ for every model (one Ray task each).")


def run(args: argparse.Namespace) -> int:
    job = _common.load_job(args)
    _common.check_input(job.run_dir, "run directory")
    resources = _common.connect(job, embed_models=())
    _stages.neighbours_stage(job, resources)
    return 0


if __name__ == "__main__":
    _common.main(PROG, build_parser(), run)
