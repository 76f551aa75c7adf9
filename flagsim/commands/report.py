"""`flagsim report`: a self-contained HTML page and a PNG contact sheet of a run's neighbours."""

from __future__ import annotations

import argparse
import os
import stat

from flagsim.app import options
from flagsim.config import check_writable


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="write an HTML report (query flags, top-k per model, agreement, evaluation) and a PNG",
        description="Write one self-contained HTML page (images inlined, no network; its one "
        "inline script, for the search box and maps, is pinned by a hash in the page's CSP) "
        "showing each query image with its top-k neighbours per model and for the ensemble, the "
        "model-agreement matrix and the evaluation table, plus a PNG contact sheet of the same "
        "grid. Queries default to the config's report.queries; those not in the run are skipped "
        "with a note.",
    )
    options.add_run_options(p)
    p.add_argument("--out", metavar="HTML", help="output page (default: RUN_DIR/report.html)")
    p.add_argument("--png", metavar="PNG",
                   help="contact sheet, .png, .jpg or .webp (default: next to the page, e.g. "
                   "RUN_DIR/report.png)")
    p.add_argument("--queries", type=options.split_names, default=None, metavar="A,B",
                   help="query names or image ids, comma-separated; double-quote one that holds "
                   "a comma: '\"Korea, South\",Chad' (default: the config's report.queries)")
    p.add_argument("-k", type=int, default=None, metavar="K",
                   help="neighbours per model (default: the config's report.k)")
    p.add_argument("--pairs", metavar="FILE",
                   help="labelled pairs for the evaluation table (default: the config's or bundled; "
                   "one that cannot be read is an error, a default one a note on the page)")
    options.add_models_arg(p, "models to show (default: every embedded model)")
    return p


#: What `os.lstat` found at an output path that is not a regular file, by `stat` test.
_KINDS = (("S_ISLNK", "symbolic link"), ("S_ISFIFO", "FIFO"), ("S_ISCHR", "character device"),
          ("S_ISBLK", "block device"), ("S_ISSOCK", "socket"))


def _run_holding(path: str) -> str | None:
    """The nearest folder above `path` (resolved) that is a flagsim run (has `_meta/run.json`)."""
    d = os.path.dirname(path)
    while True:
        if os.path.isfile(os.path.join(d, "_meta", "run.json")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def check_outputs(run_dir: str, out: str | None, png: str | None) -> None:
    """The page and the sheet are written to a temporary file renamed over their targets, so
    each must be a new or a regular file outside every run's data: not a directory, FIFO,
    device, socket or symlink (they became regular files), not in a run's table or sidecar
    folders nor onto a Parquet file (they replaced a shard), and not onto each other, whether
    --png is given or next to the page by default (`--out X.png`: the sheet replaced the page)."""
    from flagsim.errors import ConfigError
    from flagsim.inputfiles import is_parquet_file
    from flagsim.report.build import default_png, sheet_format
    from flagsim.rundir import RunDir
    from flagsim.storage import Location, is_uri

    page = out or str(RunDir.at(run_dir).report)
    sheet = png or str(default_png(page))

    def same(a: str, b: str) -> bool:
        return a == b if is_uri(a) or is_uri(b) else os.path.realpath(a) == os.path.realpath(b)

    if same(page, sheet):
        if png:
            raise ConfigError("--out and --png name the same file; give the contact sheet its own")
        raise ConfigError(f"--out {out} and its contact sheet (by default {sheet}) are the same "
                          f"file; name the page .html or give the sheet its own with --png")
    root = None if is_uri(run_dir) else os.path.realpath(run_dir)
    for label, path, name in ((("--out" if out else "page"), page, "report.html"),
                              (("--png" if png else "contact sheet"), sheet, "report.png")):
        if is_uri(path):
            if is_parquet_file(Location.parse(path)):
                raise ConfigError(f"{label} {path} is a Parquet file; the report would replace "
                                  f"it, name another file")
            continue
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # new (or unreadable: the write names the problem)
            mode = None
        if mode is not None:
            kind = next((what for test, what in _KINDS if getattr(stat, test)(mode)), None)
            if kind is not None:  # renamed over, it would become a regular file
                raise ConfigError(f"{label} {path} is a {kind}, not a regular file; the report "
                                  f"would replace it, name another file")
            if stat.S_ISDIR(mode):  # found only when writing, after all the work
                raise ConfigError(f"{label} {path} is a directory; name the file, e.g. "
                                  f"{os.path.join(path, name)}")
        target = os.path.realpath(path)
        if root is not None:
            inside = os.path.dirname(target) != root and target.startswith(root + os.sep)
            if inside or target == os.path.join(root, "images.parquet") or target == root:
                raise ConfigError(f"{label} {path} is inside the run's data; write the report "
                                  f"next to it (the default) or outside {run_dir}")
        other = _run_holding(target)
        if other is not None and other != root and target not in (
                os.path.join(other, "report.html"), os.path.join(other, "report.png")):
            raise ConfigError(f"{label} {path} is inside another run's data ({other}); write "
                              f"the report outside it")
        if mode is not None and is_parquet_file(Location.parse(path)):
            raise ConfigError(f"{label} {path} is a Parquet file; the report would replace it, "
                              f"name another file")
    sheet_format(sheet)  # after the checks above: a .bin that is Parquet is named as such


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
