"""`flagsim index`: build (or check) the FAISS index of each model's embeddings."""

from __future__ import annotations

import argparse
import logging

from flagsim.app import options

log = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "index",
        help="build a FAISS cosine index per model and for their ensemble 'all' (exact by default; "
        "IVF/HNSW/IVF-PQ for large runs)",
        description="Normalise each model's embeddings and save a FAISS inner-product index with "
        "its id map and a manifest under index/model=<name>/, and the same for the ensemble "
        "'all' of two or more models (mean cosine). Up-to-date indexes are kept; one "
        "whose source shards changed, or that was built with other settings, is rebuilt. "
        "index.kind=auto picks exact search up to the measured crossover (or index.exact_max_rows) within "
        "index.memory_budget_gb, else IVF or IVF-PQ, and records the measured recall.",
    )
    options.add_run_options(p, models="models to index (default: every model with embeddings)")
    p.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw", "ivfpq"],
                   help="index kind (overrides index.kind)")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--check", action="store_true",
                   help="only check that the indexes are up to date and their files match their "
                   "manifests, sha256 included (exit 2 naming a stale one)")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flagsim.console import plain, safe, stdout_console
    from flagsim.errors import DataError
    from flagsim.pipeline.ray_session import ray_address
    from flagsim.rundir import RunDir
    from flagsim.search.build_tasks import ensure_indexes
    from flagsim.search.catalog import search_tables
    from flagsim.search.saved import index_state

    cfg = options.config_from_args(args, {"index.kind": args.kind})
    run = RunDir.at(options.run_dir_from(args, cfg, writable=not args.check))
    # the models' indexes and the ensemble `all`'s (as `flagsim neighbours` searches them)
    tables = search_tables(run, args.models)
    if args.check:  # stale exactly when `flagsim index` would rebuild it: settings included
        for m, members in tables:
            state, reason = index_state(run, m, cfg.index, verify=True, models=list(members) or None)
            if state != "fresh":
                raise DataError(f"{reason}; run `flagsim index --models {m}`")
            print(plain(f"{m}: {reason}"))
        return 0
    # Connected to a cluster, each build is a Ray task there (as jobs/build_index.py); else
    # here, in this process: on one machine a Ray task would only add an embedded Ray's start.
    on_ray = ray_address(cfg) is not None
    built = ensure_indexes(run, tables, cfg, on_ray=on_ray, force=args.force,
                           verify=True)
    table = Table(title=f"indexes in {safe(run.root)}")
    for col in ("model", "status", "kind", "vectors", "dim", "recall", "device", "seconds"):
        table.add_column(col, justify="right" if col in ("vectors", "dim", "recall", "seconds") else "left")
    for b in built:
        man = b.manifest
        recall = "exact" if man.exact else (
            f"{man.recall:.4f}@{man.recall_k}" if man.recall is not None else "-")
        table.add_row(safe(b.model), b.status, safe(man.kind), str(man.count), str(man.dim), recall,
                      safe(man.device),
                      f"{man.build_seconds:.2f}" if man.build_seconds is not None else "-")
    stdout_console().print(table)
    from flagsim.commands.neighbours import warn_low_recall

    for b in built:
        if not b.manifest.exact:
            warn_low_recall(b.model, b.manifest.kind, b.manifest.recall, b.manifest.recall_k)
    return 0
