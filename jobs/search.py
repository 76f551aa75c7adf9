"""Ray job: search a table of new images (or embeddings) in a run's indexes (the batch query job).

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \\
        -- python jobs/search.py --config configs/cluster-gpu.yaml --run s3://bucket/run \\
           --queries s3://bucket/new/images.parquet --out s3://bucket/searches/new

The queries are embedded by the embed pipeline (each model's recorded weights) into the output
directory, then searched by the neighbours job; parts already written are kept (resumable).
"""

from flagsim.app import jobs

if __name__ == "__main__":
    jobs.main(jobs.search_parser("jobs/search.py"), jobs.search)
