"""Ray job: the top-k neighbour table of every image, for each model (self excluded).

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/neighbours.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

A Ray Data job (search actors holding each index part); a model without a fresh index gets one
built first; parts already written are kept, so submitting it again resumes.
"""

from flagsim.app import jobs

if __name__ == "__main__":
    jobs.main(jobs.neighbours_parser("jobs/neighbours.py"), jobs.neighbours)
