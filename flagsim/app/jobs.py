"""The bodies of the Ray jobs in jobs/: each script builds its parser here and calls `main`.

Every job checks its whole configuration (schema, model names, resource requests, output
location, inputs) before it imports Ray, so a bad config costs a second and one line on stderr,
and no Ray session is ever started for it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from flagsim.app import stages
from flagsim.app.entry import run_guarded
from flagsim.app.logs import setup_logging
from flagsim.app.options import add_config_args, add_embed_args, add_models_arg, add_run_arg

log = logging.getLogger("flagsim.jobs")

Body = Callable[[argparse.Namespace], int]


#: what `--models` defaults to in a job that embeds, and in one that reads an existing run
EMBED_MODELS = "comma-separated models (default: the config's embed.models)"
RUN_MODELS = ("comma-separated models of the run, `all` for their ensemble (default: every "
              "model the run holds, and all when there are two or more)")


def parser(prog: str, description: str, *, models: bool = True, run_dir: bool = True,
           models_help: str = EMBED_MODELS) -> argparse.ArgumentParser:
    """`--config YAML`, repeatable `--set key=value`, `--run RUN_DIR` (old spelling `--out`),
    `--models A,B`, and `-v`."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(p)
    if run_dir:
        add_run_arg(p, deprecated_out=True)
    if models:
        add_models_arg(p, models_help)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p


def main(p: argparse.ArgumentParser, body: Body) -> None:
    """Parse arguments, run `body`, and exit: 0 ok, 1 partial failure, 2 a one-line error."""
    args = p.parse_args()
    setup_logging(args.verbose)
    sys.exit(run_guarded(p.prog, body, args, "submit the same job again to resume"))


# --- embed, index, neighbours, pipeline --------------------------------------------------------

def embed_parser(prog: str) -> argparse.ArgumentParser:
    p = parser(prog, "Embed every image with every model (Ray Data actor pools).")
    add_embed_args(p, "discard existing shards and redo")
    return p


def embed(args: argparse.Namespace) -> int:
    job = stages.prepare(args, images=args.images)
    stages.connect(job)
    stages.log_embed_summary(stages.embed(job, images=args.images, force=args.force))
    return 0


def index_parser(prog: str) -> argparse.ArgumentParser:
    p = parser(prog, "Build the FAISS index of every embedded model and of their ensemble `all` "
               "(one Ray task each).", models_help=RUN_MODELS)
    p.add_argument("--force", action="store_true", help="rebuild even when an index is fresh")
    return p


def index(args: argparse.Namespace) -> int:
    job = stages.prepare(args, existing_run=True)
    stages.connect(job, embed_models=())
    stages.index_tasks(job, force=args.force)
    return 0


def neighbours_parser(prog: str) -> argparse.ArgumentParser:
    return parser(prog, "Write neighbours/model=<name>/ for every model and the ensemble `all` "
                  "(a Ray Data job: search actors over the query shards, resumable by part).",
                  models_help=RUN_MODELS)


def neighbours(args: argparse.Namespace) -> int:
    job = stages.prepare(args, existing_run=True)
    stages.connect(job, embed_models=())
    stages.neighbour_tables(job)
    return 0


def search_parser(prog: str) -> argparse.ArgumentParser:
    p = parser(prog, "Search a table of images (or embeddings) in the run's indexes: OUT gets the "
               "queries' embeddings and results/model=<name>/ (the neighbours job, resumable).",
               run_dir=False, models_help=RUN_MODELS)
    add_run_arg(p)  # --out is the results here, as in `flagsim search` (not the old --run)
    p.add_argument("--queries", required=True, metavar="TABLE", help="images or embeddings table")
    p.add_argument("--out", "--search-out", dest="search_out", required=True, metavar="OUT",
                   help="output directory: the queries' embeddings and results/model=<name>/")
    p.add_argument("-k", type=int, default=None, metavar="K", help="results per query")
    return p


def search(args: argparse.Namespace) -> int:
    job = stages.prepare(args, existing_run=True)
    stages.connect(job)
    stages.search_queries(job, args.queries, args.search_out, args.k)
    return 0


def pipeline_parser(prog: str) -> argparse.ArgumentParser:
    p = parser(prog, "Embed, index, neighbours and report for one run directory.")
    add_embed_args(p, "redo every stage")
    p.add_argument("--no-report", action="store_true",
                   help="stop before the report (after the neighbour and dedup tables)")
    return p


def pipeline(args: argparse.Namespace) -> int:
    job = stages.prepare(args, images=args.images)
    stages.connect(job)
    stages.log_pipeline(stages.pipeline(
        job.cfg, run_dir=job.run_dir, images=args.images, models=list(job.models),
        force=args.force, report=not args.no_report, show_progress=False,
    ))
    return 0


# --- scrape ------------------------------------------------------------------------------------

def scrape_parser(prog: str) -> argparse.ArgumentParser:
    """The scrape job's own options; the script adds `flagsim scrape`'s (they live in the CLI)."""
    p = parser(prog, "Download the flags of Wikipedia's list into the run directory.",
               models=False, run_dir=False)
    p.add_argument("--out", "--run", dest="run_dir", metavar="RUN_DIR",
                   help="output directory: a path or a URI such as s3://bucket/flags "
                   "(default: the config's run_dir)")
    return p


def scrape(args: argparse.Namespace, options: Callable[[argparse.Namespace], object]) -> int:
    """Scrape into the job's run directory with the ScrapeOptions `options(args)` makes (after
    the config is checked); 1 when a flag failed and --strict was given."""
    from flagsim.scrape import scrape as run_scrape

    job = stages.prepare(args)
    result = run_scrape(job.run_dir, options(args))
    failed = len(result.errors)
    log.info(
        "%d of %d flags -> %s (downloaded %d, unchanged %d, already present %d, failed %d)%s",
        result.table.num_rows, result.listed, result.images_table, result.downloaded,
        result.unchanged, result.reused, failed, f"; see {result.errors_csv}" if failed else "",
    )
    return 1 if failed and args.strict else 0
