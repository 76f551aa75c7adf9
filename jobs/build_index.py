"""Ray job: build (or keep, when fresh) the FAISS cosine index of each model and their ensemble.

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/build_index.py --config configs/cluster-gpu.yaml [--run s3://bucket/run]

One Ray task per model and one for the ensemble `all`, on a GPU when index.use_gpu allows and the cluster has one.
"""

from flagsim.app import jobs

if __name__ == "__main__":
    jobs.main(jobs.index_parser("jobs/build_index.py"), jobs.index)
