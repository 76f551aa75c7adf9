"""`flagsim search`: the batch query job, a table of new images searched in a run's indexes."""

from __future__ import annotations

import argparse

from flagsim.app import options

HELP = "search a table of images (or embeddings) in a run's indexes: top-k of every query (Parquet)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search",
        help=HELP,
        description="Embed every image of --queries (an images table, embedded by the embed "
        "pipeline with each model's recorded weights) or take its vectors (an embeddings table, "
        "or another run), search each model's index of --run (and the ensemble `all`) with the "
        "neighbours job, and write OUT/results/model=<name>/part-*.parquet (query_id, query, "
        "rank, neighbour_id, neighbour, score). The query itself is not excluded. Resumable.",
    )
    options.add_run_options(p, models="models (default: every model of the run, plus `all`)")
    p.add_argument("--queries", required=True, metavar="TABLE",
                   help="images table (.parquet or a folder with images.parquet), embeddings "
                   "Parquet (one model: name it with --models), or a flagsim run")
    p.add_argument("--out", dest="search_out", required=True, metavar="OUT",
                   help="output directory (a run of the queries: their embeddings and results/)")
    p.add_argument("-k", type=int, default=None, metavar="K",
                   help="results per query (default: neighbours.k)")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flagsim.console import safe, stdout_console
    from flagsim.search.batch import run_search

    cfg = options.config_from_args(args, {"neighbours.k": args.k})
    run_dir = options.run_dir_from(args, cfg)
    results = run_search(run_dir, args.queries, args.search_out, args.models, cfg.neighbours.k, cfg)
    table = Table(title=f"top-{cfg.neighbours.k} of each query in {safe(run_dir)}")
    for col in ("model", "queries", "rows", "written", "index", "recall", "path"):
        table.add_column(col)
    for r in results:
        recall = "exact" if r.index_kind == "flat" else (f"{r.recall:.4f}" if r.recall is not None else "-")
        table.add_row(safe(r.model), str(r.queries), str(r.rows), str(r.written), safe(r.index_kind),
                      recall, safe(r.path))
    stdout_console().print(table)
    from flagsim.commands.neighbours import warn_low_recall

    for r in results:
        warn_low_recall(r.model, r.index_kind, r.recall, r.recall_k)
    return 0
