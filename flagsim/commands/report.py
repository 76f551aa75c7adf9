"""`flagsim report`: a self-contained HTML page and a PNG contact sheet of a run's neighbours."""

from __future__ import annotations

import argparse
import os

from flagsim.app import options
from flagsim.config import check_writable


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="write an HTML report (query flags, top-k per model, agreement, evaluation) and a PNG",
        description="Write one self-contained HTML page (images inlined, no scripts, no network) "
        "showing each query image with its top-k neighbours per model and for the ensemble, the "
        "model-agreement matrix and the evaluation table, plus a PNG contact sheet of the same "
        "grid. Queries default to the config's report.queries; those not in the run are skipped "
        "with a note.",
    )
    options.add_run_options(p)
    p.add_argument("--out", metavar="HTML", help="output page (default: RUN_DIR/report.html)")
    p.add_argument("--png", metavar="PNG",
                   help="contact sheet (default: next to the page, e.g. RUN_DIR/report.png)")
    p.add_argument("--queries", type=options.split_csv, default=None, metavar="A,B",
                   help="query names or image ids (default: the config's report.queries)")
    p.add_argument("-k", type=int, default=None, metavar="K",
                   help="neighbours per model (default: the config's report.k)")
    p.add_argument("--pairs", metavar="FILE",
                   help="labelled pairs for the evaluation table (default: the config's or bundled; "
                   "one that cannot be read is an error, a default one a note on the page)")
    options.add_models_arg(p, "models to show (default: every embedded model)")
    return p


def check_outputs(run_dir: str, out: str | None, png: str | None) -> None:
    """The page and the sheet go outside the run's data: not into its table folders or onto
    images.parquet (they replaced a shard), and not onto each other."""
    from flagsim.errors import ConfigError
    from flagsim.storage import is_uri

    if png and out and os.path.realpath(png) == os.path.realpath(out):
        raise ConfigError("--out and --png name the same file; give the contact sheet its own")
    for opt, path, name in (("--out", out, "report.html"), ("--png", png, "report.png")):
        if path and os.path.isdir(path):  # found only when writing, after all the work
            raise ConfigError(f"{opt} {path} is a directory; name the file, e.g. "
                              f"{os.path.join(path, name)}")
    if is_uri(run_dir):
        return
    root = os.path.realpath(run_dir)
    for opt, path in (("--out", out), ("--png", png)):
        if not path:
            continue
        target = os.path.realpath(path)
        inside = os.path.dirname(target) != root and target.startswith(root + os.sep)
        if inside or target == os.path.join(root, "images.parquet") or target == root:
            raise ConfigError(f"{opt} {path} is inside the run's data; write the report next to "
                              f"it (the default) or outside {run_dir}")


def run(args: argparse.Namespace) -> int:
    from flagsim.console import plain
    from flagsim.report import build_report
    from flagsim.search.evaluate import read_pairs

    cfg = options.config_from_args(args, {"report.k": args.k})
    run_dir = options.run_dir_from(args, cfg)
    check_outputs(run_dir, args.out, args.png)
    html_dir = (os.path.dirname(args.out) or ".") if args.out else run_dir
    check_writable(html_dir)
    if args.png:
        check_writable(os.path.dirname(args.png) or ".")
    if args.pairs:  # asked for: a file that cannot be read is an error, not a note on the page
        read_pairs(args.pairs)
    paths = build_report(
        run_dir,
        queries=args.queries,
        k=cfg.report.k,
        pairs=args.pairs or cfg.report.pairs,
        out=args.out,
        png=args.png,
        models=args.models,
        default_queries=cfg.report.queries,
        map_max=cfg.report.map_max,
        thumbs_max=cfg.report.thumbs_max,
        projection=cfg.report.projection,
        cfg=cfg,
    )
    print(plain(f"report -> {paths.html}"))
    print(plain(f"contact sheet -> {paths.png}"))
    if paths.skipped:
        # not in the run, or a name of several images: the page's notes say which
        print(plain(f"skipped queries (see the notes at the top of the page): "
                    f"{', '.join(paths.skipped)}"))
    return 0
