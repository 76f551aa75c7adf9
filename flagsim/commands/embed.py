"""`flagsim embed`: embed every image with every configured model on Ray Data."""

from __future__ import annotations

import argparse

from flagsim.commands.common import add_config_args, config_from_args, run_dir_from, split_csv


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "embed",
        help="embed the run's images with each model (Ray Data actor pools) into Parquet shards",
        description="Read the images table once, decode every image once, and stream it through "
        "one actor pool per model, writing embeddings/model=<name>/part-NNNNN.parquet and a "
        "manifest per model. Reruns skip finished models and shards; --force redoes them.",
    )
    add_config_args(p)
    p.add_argument("--out", "--run", dest="run_dir", metavar="RUN_DIR",
                   help="run directory, path or URI (default: the config's run_dir)")
    p.add_argument("--images", metavar="TABLE",
                   help="images table (.parquet or a run directory) to embed; default: the run's own, "
                   "else the config's images source")
    p.add_argument("--models", type=split_csv, metavar="A,B", help="models to run (default: the config's)")
    p.add_argument("--force", action="store_true", help="discard existing shards and redo")
    p.add_argument("--repair", action="store_true",
                   help="first delete unreadable/foreign/inconsistent shards, then redo only those")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:

    from flagsim.pipeline.embed import print_summary, run_embed

    cfg = config_from_args(args)
    run_dir = run_dir_from(args, cfg, writable=True)
    summary = run_embed(
        cfg, run_dir=run_dir, images=args.images, models=args.models, force=args.force,
        repair_shards=args.repair, show_progress=not args.no_progress,
    )
    print_summary(summary)
    failed = [r for r in summary.results if r.status == "failed"]
    return 1 if failed else 0
