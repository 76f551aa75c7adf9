"""`flagsim images`: build a run's images table from a folder or a CSV (or the bundled flags)."""

from __future__ import annotations

import argparse
import logging

from flagsim.config import check_writable
from flagsim.errors import ConfigError
from flagsim.images import bundled_table, from_csv_with_missing, from_folder, write_images_table
from flagsim.rundir import RunDir

log = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "images",
        help="build the images table (images.parquet) from a folder, a CSV or the bundled flags",
        description="Build DATA_DIR/images.parquet. --from-folder takes every image under DIR; "
        "--from-csv takes a `Country,Flag Image` CSV whose files are named from the country "
        "(spaces -> _, [ ] removed, + .png) in --image-dir; --bundled takes the 197 flags "
        "shipped with flagsim.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-folder", metavar="DIR", help="every image file under DIR (recursive)")
    src.add_argument("--from-csv", metavar="CSV", help="a CSV with a Country column")
    src.add_argument("--bundled", action="store_true", help="the bundled flag set")
    p.add_argument("--image-dir", metavar="DIR", help="folder of the CSV's images (with --from-csv)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="run/data directory (path or URI)")
    return p


def run(args: argparse.Namespace) -> int:
    check_writable(args.out)
    errors: list[dict] = []
    if args.from_folder:
        table = from_folder(args.from_folder)
    elif args.from_csv:
        if not args.image_dir:
            raise ConfigError("--from-csv needs --image-dir DIR")
        table, errors = from_csv_with_missing(args.from_csv, args.image_dir)
    else:
        table = bundled_table()
    loc = write_images_table(table, RunDir.at(args.out), errors)
    print(f"{table.num_rows} images -> {loc}" + (f" ({len(errors)} missing, see errors/)" if errors else ""))
    return 0
