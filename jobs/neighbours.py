"""Ray job: the top-k neighbour table of every image, for each model (self excluded).

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/neighbours.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

One Ray task per model; a model without a fresh index gets one built first.
"""

from flagsim.app import jobs

if __name__ == "__main__":
    jobs.main(jobs.neighbours_parser("jobs/neighbours.py"), jobs.neighbours)
