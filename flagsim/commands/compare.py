"""`flagsim compare`: the original experiment's checks, per-model top-k, ensemble and agreement."""

from __future__ import annotations

import argparse
import json

from flagsim.app import options


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare",
        help="compare models: top-k per query per model, the ensemble, and model agreement",
        description="For each QUERY (default: Chad and Australia, the original experiment's two "
        "checks) show the top-k of every model and of the ensemble `all` (mean cosine over the "
        "models), how many models agree on the top match, and the agreement matrix: the mean "
        "overlap of top-k neighbour sets between each pair of models over all images.",
    )
    p.add_argument("queries", nargs="*", metavar="QUERY", help="image names (default: Chad Australia, those the run has; else its first two images)")
    options.add_run_options(p, models="models (default: every model with embeddings)")
    p.add_argument("-k", type=int, default=5, metavar="K", help="neighbours per model (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from flagsim.console import safe, stdout_console
    from flagsim.search.catalog import ENSEMBLE
    from flagsim.search.compare import ORIGINAL_CHECKS, compare, top1_counts

    cfg = options.config_from_args(args)
    run_dir = options.run_dir_from(args, cfg)
    queries = args.queries or list(ORIGINAL_CHECKS)
    c = compare(run_dir, queries, k=args.k, models=args.models, cfg=cfg, defaults=not args.queries)
    if args.json:
        print(json.dumps(c.to_json(), indent=2, ensure_ascii=False))
        return 0
    console = stdout_console()
    for q in c.queries:
        table = Table(title=f"top-{c.k} most similar to {safe(q)}")
        table.add_column("model")
        for r in range(c.k):
            table.add_column(f"#{r + 1}")
        for m, hits in c.results[q].items():
            label = f"{ENSEMBLE} (mean cosine)" if m == ENSEMBLE else safe(m)
            table.add_row(label, *[f"{safe(h.name)} ({h.score:.3f})" for h in hits])
        console.print(table)
        counts = top1_counts(c, q)
        n = sum(counts.values())
        summary = ", ".join(f"{safe(name)} for {cnt} of {n}" for name, cnt in counts.most_common())
        line = f"{safe(q)}: top match {summary} model(s)"
        if q in ORIGINAL_CHECKS:
            line += f" (the original experiment reported {ORIGINAL_CHECKS[q]})"
        console.print(line)
    agree = Table(title=f"model agreement (mean top-{c.k} overlap)")
    agree.add_column("")
    for m in c.models:
        agree.add_column(safe(m), justify="right")
    for a in c.models:
        agree.add_row(safe(a), *[f"{c.agreement.loc[a, b]:.2f}" for b in c.models])
    console.print(agree)
    return 0
