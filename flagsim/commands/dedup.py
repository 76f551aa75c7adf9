"""`flagsim dedup`: groups of near-duplicate images per model, from the neighbour tables."""

from __future__ import annotations

import argparse

from flagsim.app import options

HELP = "find groups of near-duplicate images (neighbour pairs with cosine >= a threshold)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "dedup",
        help=HELP,
        description="For each model, join every pair of its neighbour table (written first when "
        "missing) whose cosine is at least the threshold, and write the connected components of "
        "two or more images to dedup/model=<name>/part-00000.parquet (group, size, image_id, name, "
        "representative_id, score to the representative). `pairs` in the summary counts directed "
        "neighbour pairs (a group of 3 that are each other's neighbours: 6). The default threshold "
        "is the model's calibrated one (pixels, colour-layout; see docs/query.md).",
    )
    options.add_run_options(p, models="models (`all`: the ensemble's table; default: every model "
                                      "with a calibrated threshold)")
    p.add_argument("--model", dest="models", type=options.split_csv, help=argparse.SUPPRESS)
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="cosine at or above which two images are copies, less 1e-5 for float32 "
                   "rounding (so 1 groups identical vectors; default: calibrated)")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flagsim.console import safe, stdout_console
    from flagsim.search.dedup import write_dedup

    cfg = options.config_from_args(args)
    run_dir = options.run_dir_from(args, cfg, writable=True)
    results = write_dedup(run_dir, args.models, args.threshold, cfg)
    table = Table(title="near-duplicate groups")
    for col in ("model", "threshold", "groups", "images", "pairs", "path"):
        table.add_column(col, justify="right" if col in ("threshold", "groups", "images", "pairs")
                         else "left")
    for r in results:
        table.add_row(safe(r.model), f"{r.threshold:.7g}", str(r.groups), str(r.images), str(r.pairs),
                      safe(r.path))
    stdout_console().print(table)
    return 0
