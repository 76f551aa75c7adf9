"""Ray job: scrape Wikipedia's national flags into the run directory (images + images table).

    ray job submit --working-dir . --runtime-env configs/runtime_env.yaml \
        -- python jobs/scrape_flags.py --config configs/cluster-gpu.yaml --out s3://bucket/flags

Downloading a few hundred thumbnails is one polite, rate-limited client, so this runs on the
job's driver and needs no Ray workers; the images land where the embed job reads them (a shared
path or an object store). Every `flagsim scrape` option is accepted (see --help).
"""

from __future__ import annotations

import argparse
import logging

import _common

log = logging.getLogger("flagsim.jobs.scrape")
PROG = "jobs/scrape_flags.py"


class _Into:
    """Lets `flagsim.commands.scrape.add_parser` add its options to our parser; its required
    `--out` becomes the jobs' optional `--out/--run` (default: the config's run_dir)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_parser(self, _name: str, **_kwargs) -> _Into:
        return self

    def add_argument(self, *flags: str, **kwargs):
        if "--out" in flags:
            return self.parser.add_argument(
                "--out", "--run", dest="run_dir", metavar="RUN_DIR",
                help="output directory: a path or a URI such as s3://bucket/flags "
                "(default: the config's run_dir)",
            )
        return self.parser.add_argument(*flags, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.parser, name)


def build_parser() -> argparse.ArgumentParser:
    from flagsim.commands import scrape as scrape_cmd

    p = _common.parser(PROG, "Download the flags of Wikipedia's list into the run directory.",
                       models=False, run_dir=False)
    scrape_cmd.add_parser(_Into(p))  # every `flagsim scrape` option
    return p


def run(args: argparse.Namespace) -> int:
    from flagsim.commands.scrape import options_from_args
    from flagsim.scrape import scrape

    job = _common.load_job(args)
    opts = options_from_args(args)  # validates the options (ConfigError)
    result = scrape(job.run_dir, opts)
    failed = len(result.errors)
    log.info(
        "%d of %d flags -> %s (downloaded %d, unchanged %d, already present %d, failed %d)%s",
        result.table.num_rows, result.listed, result.images_table, result.downloaded,
        result.unchanged, result.reused, failed, f"; see {result.errors_csv}" if failed else "",
    )
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    _common.main(PROG, build_parser(), run)
