"""`flagsim eval`: hit@1 and hit@5 per model and for the ensemble on labelled similar images."""

from __future__ import annotations

import argparse
import json

from flagsim.app import options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="score each model (and the ensemble) on a labelled file of visually similar images",
        description="For each labelled query (UTF-8 CSV `query,similar`, similar names separated by "
        "';', '#' lines are comments; a repeated pair counts once) count a hit@k when one of its "
        "similar images is among its top-k neighbours. Default labels: the bundled similar_flags.csv, made by hand from the flag "
        "designs.",
    )
    options.add_run_options(p, models="models (default: every model with embeddings)")
    p.add_argument("--pairs", metavar="FILE",
                   help="labelled pairs file (default: report.pairs, else the bundled similar_flags.csv)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flagsim.console import safe, stdout_console
    from flagsim.search.evaluate import evaluate

    cfg = options.config_from_args(args)
    run_dir = options.run_dir_from(args, cfg)
    df = evaluate(run_dir, args.pairs or cfg.report.pairs, args.models, cfg=cfg)
    if args.json:
        print(json.dumps(json.loads(df.to_json(orient="records")), indent=2))
        return 0
    table = Table(title="hit@k on labelled similar images")
    for col in df.columns:
        table.add_column(safe(col), justify="left" if col == "model" else "right")
    for rec in df.to_dict(orient="records"):
        table.add_row(safe(rec["model"]), str(rec["pairs"]),
                      *[f"{rec[c]:.3f}" for c in df.columns if c.startswith("hit@")])
    stdout_console().print(table)
    return 0
