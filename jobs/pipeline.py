"""Ray job: the whole run, embed -> index -> neighbours -> report, in one submission.

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/pipeline.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

Runs flagsim.app.stages.pipeline (what `flagsim pipeline` runs): embedding streams through the
cluster's actor pools; index, neighbour tables and report are built by the job's driver (submit
with `--entrypoint-num-gpus 1` to place it on a GPU node). The separate jobs build_index.py and
neighbours.py instead run one Ray task per model anywhere in the cluster. Every stage resumes:
finished shards, fresh indexes and written tables are kept.
"""

from flagsim.app import jobs

if __name__ == "__main__":
    jobs.main(jobs.pipeline_parser("jobs/pipeline.py"), jobs.pipeline)
