"""`flagsim neighbours`: the batch top-k neighbour table of every image for every model."""

from __future__ import annotations

import argparse
import logging

from flagsim.app import options

log = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "neighbours",
        help="write the top-k neighbours of every image for every model (Parquet)",
        description="For each model, and for the ensemble `all` (mean cosine over the models) "
        "when there are two or more, search its index (built or rebuilt when needed) with every "
        "image's own embedding and write neighbours/model=<name>/part-NNNNN.parquet (one part "
        "per embedding shard) with columns query_id, query, rank, neighbour_id, neighbour, "
        "score (cosine), and model from the folder name when the table is read whole; the image "
        "itself is excluded. A Ray Data job: search actors "
        "hold the index (neighbours.num_actors per index part), queries go in batches of "
        "neighbours.batch_size; parts already written are kept, so a rerun resumes. With "
        "--models, `all` is written only when named (e.g. --models clip,dinov2,all).",
    )
    options.add_run_options(p, models="models (default: every model with embeddings)")
    p.add_argument("-k", type=int, default=None, metavar="K",
                   help="neighbours per image (default: neighbours.k)")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flagsim.console import safe, stdout_console
    from flagsim.search.neighbours import write_neighbours

    cfg = options.config_from_args(args, {"neighbours.k": args.k})
    run_dir = options.run_dir_from(args, cfg, writable=True)
    results = write_neighbours(run_dir, cfg.neighbours.k, args.models, cfg)
    table = Table(title=f"top-{cfg.neighbours.k} neighbours")
    for col in ("model", "images", "rows", "parts", "written", "index", "recall", "seconds", "path"):
        table.add_column(col)
    for r in results:
        table.add_row(safe(r.model), str(r.queries), str(r.rows), str(r.parts), str(r.written),
                      safe(r.index_kind), recall_text(r.recall, r.recall_k), f"{r.seconds:.2f}",
                      safe(r.path))
    stdout_console().print(table)
    for r in results:
        warn_low_recall(r.model, r.index_kind, r.recall, r.recall_k)
    return 0


#: below this measured recall an approximate index is worth a warning (docs/query.md's target)
RECALL_TARGET = 0.95


def warn_low_recall(model: str, kind: str, recall: float | None, k: int | None) -> None:
    """One warning when an approximate index finds less than RECALL_TARGET of the exact top-k
    on its recall sample, saying what to change."""
    if kind == "flat" or recall is None or k is None or recall >= RECALL_TARGET:
        return
    log.warning("%s: the %s index finds %.0f%% of the exact top-%d (its recall sample); raise "
                "index.nprobe (IVF) or index.hnsw_m (HNSW), or --set index.kind=flat for exact "
                "results", model, kind, 100 * recall, k)


def recall_text(recall: float | None, k: int | None) -> str:
    """`exact` for an exact index, else the measured recall@k (`-` when none was measured)."""
    if recall is None:
        return "-"
    if k is None:
        return "exact"
    return f"{recall:.3f}@{k}"
