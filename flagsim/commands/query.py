"""`flagsim query`: the top-k of one image (by name or image file) or of a text, side by side per model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from flagsim.app import options

if TYPE_CHECKING:
    from flagsim.config import Config
    from flagsim.search.query import QueryResult


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "query",
        help="show the top-k most similar images of a name or an image file, per model",
        description="NAME_OR_IMAGE is an image's name or id in the run (case-insensitive; unknown "
        "names get close matches), or an image file (a path with / or an image suffix, or an "
        "existing file). A name or id of the run wins over a file of the same path (`a/x` is the "
        "image with id a/x); write ./a/x, an absolute path or use --image for the file. A file "
        "is decoded like the pipeline does and embedded with each "
        "model's own preprocessing and recorded weights (a file with the same bytes as one of "
        "the run's images uses its stored embeddings); models whose weights are unavailable "
        "are skipped with a note. The `all` column ranks by mean cosine over the models. "
        "--text TEXT instead ranks the run's images against a text, embedded by the text tower "
        "of each model that has one (such as clip), with the weights recorded in its manifest.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("query", metavar="NAME_OR_IMAGE", nargs="?")
    what.add_argument("--text", metavar="TEXT",
                      help="rank the images against TEXT (the models with a text tower, such as clip)")
    options.add_run_options(p)
    p.add_argument("--model", "--models", dest="models", default="all", metavar="M|all",
                   help="a model, a comma-separated list, or all (default) to add the ensemble")
    p.add_argument("-k", type=int, default=5, metavar="K", help="neighbours to show (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--image", action="store_true", help="treat NAME_OR_IMAGE as an image file")
    return p


def _text_query(args: argparse.Namespace, cfg: Config, run_dir: str,
                wanted: list[str]) -> QueryResult:
    from flagsim.errors import ConfigError
    from flagsim.search.query import query_text

    if args.image:
        raise ConfigError("--image and --text cannot be used together")
    return query_text(run_dir, args.text, k=args.k, models=wanted or None, cfg=cfg)


def run(args: argparse.Namespace) -> int:
    from flagsim.console import plain
    from flagsim.search.query import query

    cfg = options.config_from_args(args)
    run_dir = options.run_dir_from(args, cfg)
    wanted = options.split_csv(args.models)
    everything = not wanted or wanted == ["all"]
    if args.text is not None:
        result = _text_query(args, cfg, run_dir, [] if everything else wanted)
    else:
        result = query(run_dir, args.query, k=args.k, models=None if everything else wanted,
                       cfg=cfg, ensemble=everything or "all" in wanted,
                       as_image=True if args.image else None)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
        return 0
    for m, reason in result.skipped.items():
        print(plain(f"note: {m} skipped: {reason}"), file=sys.stderr)
    print_result(result)
    return 0


def print_result(result) -> None:
    from rich.table import Table

    from flagsim.console import safe, stdout_console

    title = safe(result.query_name or result.query)
    if result.kind == "image":
        title = safe(result.query) + (f" (= {safe(result.query_name)})" if result.query_name else "")
    elif result.kind == "text":
        title = f"the text {safe(repr(result.query))}"
    table = Table(title=f"top-{result.k} most similar to {title}")
    table.add_column("rank", justify="right")
    cols = list(result.results)
    for m in cols:
        table.add_column(safe(m))
    for r in range(result.k):
        cells = []
        for m in cols:
            hits = result.results[m]
            cells.append(f"{safe(hits[r].name)} ({hits[r].score:.3f})" if r < len(hits) else "")
        table.add_row(str(r + 1), *cells)
    stdout_console().print(table)
