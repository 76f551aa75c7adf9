"""Ray job: embed the run's images with every configured model into Parquet shards.

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/embed.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

Runs unchanged on a laptop (`python jobs/embed.py --config configs/default.yaml`): without
RAY_ADDRESS or ray.address it starts an embedded local Ray.
"""

from flagsim.app import jobs

if __name__ == "__main__":
    jobs.main(jobs.embed_parser("jobs/embed.py"), jobs.embed)
