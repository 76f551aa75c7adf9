"""`flagsim embed`: embed every image with every configured model on Ray Data."""

from __future__ import annotations

import argparse

from flagsim.app import options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "embed",
        help="embed the run's images with each model (Ray Data actor pools) into Parquet shards",
        description="Read the images table once, decode every image once, and stream it through "
        "one actor pool per model, writing embeddings/model=<name>/part-NNNNN.parquet and a "
        "manifest per model. Reruns skip finished models and shards; --force redoes them.",
    )
    options.add_run_options(p, models="models to run (default: the config's)", deprecated_out=True)
    options.add_embed_args(p, "discard existing shards and redo")
    p.add_argument("--repair", action="store_true",
                   help="first delete unreadable/foreign/inconsistent shards, then redo only those")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from flagsim.app import stages
    from flagsim.pipeline.embed import print_summary

    job = stages.prepare(args, images=args.images)
    print_summary(stages.embed(job, images=args.images, force=args.force, repair=args.repair,
                               show_progress=not args.no_progress))
    return 0
