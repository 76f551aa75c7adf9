"""Ray job: scrape Wikipedia's national flags into the run directory (images + images table).

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/scrape_flags.py --config configs/cluster-gpu.yaml --out s3://bucket/flags

Downloading a few hundred thumbnails is one polite, rate-limited client, so this runs on the
job's driver and needs no Ray workers; the images land where the embed job reads them (a shared
path or an object store). Every `flagsim scrape` option is accepted (see --help).
"""

from flagsim.app import jobs
from flagsim.commands import scrape

if __name__ == "__main__":
    p = jobs.scrape_parser("jobs/scrape_flags.py")
    scrape.add_options(p)  # every `flagsim scrape` option but its --out
    jobs.main(p, lambda args: jobs.scrape(args, scrape.options_from_args))
