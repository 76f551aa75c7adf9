"""Ray job: the whole run, embed -> index -> neighbours -> report, in one submission.

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/pipeline.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

Runs flagsim.app.stages.pipeline (what `flagsim pipeline` runs): embedding streams through the
cluster's actor pools; indexes and report are built by the job's driver (submit with
`--entrypoint-num-gpus 1` to place it on a GPU node), the neighbour tables by the neighbours Ray
Data job (search actors on the cluster); build_index.py instead runs one Ray task per model
anywhere in the cluster. Every stage resumes:
finished shards, fresh indexes and written tables are kept.
"""

from flagsim.app import jobs

if __name__ == "__main__":
    jobs.main(jobs.pipeline_parser("jobs/pipeline.py"), jobs.pipeline)
