"""`flagsim images`: build a run's images table from a folder, a CSV, tar shards, Parquet or URLs."""

from __future__ import annotations

import argparse
import logging

from flagsim.config import check_writable
from flagsim.errors import ConfigError
from flagsim.images import bundled_table_in, from_csv_with_missing, from_folder, write_images_table
from flagsim.rundir import RunDir

log = logging.getLogger(__name__)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "images",
        help="build the images table (images.parquet) from a folder, a CSV, webdataset shards, "
        "Parquet, a URL list or the bundled flags",
        description="Build DATA_DIR/images.parquet. --from-folder takes every image under DIR "
        "(a path or an s3:// / gs:// prefix); --from-csv takes a `Country,Flag Image` CSV whose "
        "files are named from the country (spaces -> _, [ ] removed, + .png) in --image-dir; "
        "--from-webdataset takes tar shards (brace patterns such as shard-{00000..00099}.tar); "
        "--from-parquet takes an image-bytes column; --from-urls downloads a URL list with the "
        "scraper's fetcher; --bundled takes the 197 flags shipped with flagsim. Tar members and "
        "Parquet cells are not unpacked: the table points at them. See docs/layout.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-folder", metavar="DIR", help="every image file under DIR (recursive)")
    src.add_argument("--from-csv", metavar="CSV", help="a CSV with a Country column")
    src.add_argument("--from-webdataset", metavar="PATTERN",
                     help="webdataset tar shards: a .tar, a folder of them, or a brace pattern")
    src.add_argument("--from-parquet", metavar="PATH",
                     help="a Parquet file or folder whose --image-column holds image bytes")
    src.add_argument("--from-urls", metavar="TABLE", help="a CSV or Parquet list of image URLs")
    src.add_argument("--bundled", action="store_true", help="the bundled flag set")
    p.add_argument("--image-dir", metavar="DIR", help="folder of the CSV's images (with --from-csv)")
    p.add_argument("--image-column", metavar="COL",
                   help="binary or HF {bytes, path} struct column (with --from-parquet)")
    p.add_argument("--id-column", metavar="C", help="image_id column (--from-parquet, --from-urls)")
    p.add_argument("--name-column", metavar="C", help="display-name column (--from-parquet, --from-urls; "
                   "--from-urls reads a column called name by default)")
    p.add_argument("--url-column", metavar="C", default="url", help="URL column (default: url)")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="run/data directory (path or URI)")
    from flagsim.commands.scrape import add_download_options

    add_download_options(p.add_argument_group("downloads (--from-urls; as in flagsim scrape)"))
    return p


def run(args: argparse.Namespace) -> int:
    from flagsim import sources

    check_writable(args.out)
    rund = RunDir.at(args.out)
    if args.image_column and not args.from_parquet:
        raise ConfigError("--image-column goes with --from-parquet")
    if args.from_webdataset:
        w = sources.from_webdataset(args.from_webdataset, rund)
        return _done(w.rows, rund, len(w.errors))
    if args.from_parquet:
        if not args.image_column:
            raise ConfigError("--from-parquet needs --image-column COL")
        w = sources.from_parquet(args.from_parquet, args.image_column, rund,
                                 id_column=args.id_column, name_column=args.name_column)
        return _done(w.rows, rund, len(w.errors))
    if args.from_urls:
        from flagsim.commands.scrape import download_options_from_args

        r = sources.from_urls(args.from_urls, rund, download_options_from_args(args),
                              url_column=args.url_column, id_column=args.id_column,
                              name_column=args.name_column)
        print(f"{r.images} of {r.listed} images -> {rund.images_table} (downloaded {r.downloaded}, "
              f"unchanged {r.unchanged}, already present {r.reused}, failed {len(r.errors)}"
              + (": see errors/images/)" if r.errors else ")"))
        return 0
    errors: list[dict] = []
    if args.from_folder:
        table = from_folder(args.from_folder)
    elif args.from_csv:
        if not args.image_dir:
            raise ConfigError("--from-csv needs --image-dir DIR")
        table, errors = from_csv_with_missing(args.from_csv, args.image_dir)
    else:
        table = bundled_table_in(rund)
    loc = write_images_table(table, rund, errors)
    print(f"{table.num_rows} images -> {loc}" + (f" ({len(errors)} missing, see errors/)" if errors else ""))
    return 0


def _done(rows: int, rund: RunDir, errors: int) -> int:
    print(f"{rows} images -> {rund.images_table}" + (f" ({errors} skipped, see errors/images/)" if errors else ""))
    return 0
