"""`flagsim scrape`: download Wikipedia's national flags into DATA_DIR/images with a table."""

from __future__ import annotations

import argparse
import logging
import re

from flagsim.config import check_writable
from flagsim.scrape import (
    DEFAULT_URL,
    DEFAULT_WIDTH,
    WIKIMEDIA_THUMB_STEPS,
    ScrapeOptions,
    scrape,
)

log = logging.getLogger(__name__)

_DEFAULTS = ScrapeOptions()


def byte_size(text: str) -> int:
    """`10485760`, `512K`, `10M` or `1G` as a number of bytes (argparse type)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]i?b?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 500000, 512K, 10M)")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "scrape",
        help="download the flags of Wikipedia's 'List of national flags of sovereign states'",
        description="Download every flag of the sovereign-state tables of Wikipedia's list (and, "
        "with --de-facto, of the de facto states) as DATA_DIR/images/<Name>.png, and write "
        "DATA_DIR/images.parquet (the images table) and DATA_DIR/errors.csv (one row per "
        "failed flag with its reason). Rerunning resumes: flags already downloaded with the "
        "recorded URL and sha256 are not fetched again. See docs/scraper.md.",
    )
    p.add_argument(
        "--out", required=True, metavar="DATA_DIR", help="output directory (path or URI)"
    )
    add_options(p)
    return p


def add_options(p: argparse.ArgumentParser) -> None:
    """Every option of `flagsim scrape` but --out (jobs/scrape_flags.py takes them too)."""
    p.add_argument("--url", default=DEFAULT_URL, help=f"page to scrape (default: {DEFAULT_URL})")
    p.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        metavar="PX",
        help=f"thumbnail width to download (default: {DEFAULT_WIDTH}); on upload.wikimedia.org "
        "the nearest standard width is used (" + ", ".join(map(str, WIKIMEDIA_THUMB_STEPS)) + ")",
    )
    p.add_argument(
        "--exact-width",
        action="store_true",
        help="request exactly --width even on upload.wikimedia.org (it may refuse with 429)",
    )
    p.add_argument(
        "--de-facto", action="store_true", help="also download the de facto states' flags"
    )
    p.add_argument(
        "--extra-flags",
        action="store_true",
        help="also download a state's second and later flags, as '<Name> (2)' -> <Name>_(2).png "
        "(default: only each state's first flag)",
    )
    add_download_options(p)
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any flag failed")


def add_download_options(p) -> None:
    """The fetcher's options (also `flagsim images --from-urls`): concurrency, timeouts, size
    cap, retries, User-Agent and the host policy."""
    p.add_argument(
        "--concurrency",
        type=int,
        default=_DEFAULTS.concurrency,
        metavar="N",
        help=f"parallel downloads (default: {_DEFAULTS.concurrency})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULTS.timeout,
        metavar="SECONDS",
        help="limit for connecting and for each wait for data "
        f"(default: {_DEFAULTS.timeout:g})",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="limit for one whole attempt at a download (redirects, headers and body, however "
        "slowly it arrives); a flag over it is recorded in errors.csv (default: --timeout)",
    )
    p.add_argument(
        "--max-bytes",
        type=byte_size,
        default=_DEFAULTS.max_bytes,
        metavar="SIZE",
        help="largest image body accepted, e.g. 500000, 512K, 10M (default: 10M)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=_DEFAULTS.retries,
        metavar="N",
        help="further attempts after HTTP 429/5xx, a timeout or a connection error "
        f"(default: {_DEFAULTS.retries})",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=_DEFAULTS.backoff,
        metavar="SECONDS",
        help="wait before the first retry, doubled for each further one, unless the server "
        f"sends Retry-After (default: {_DEFAULTS.backoff:g})",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=_DEFAULTS.max_wait,
        metavar="SECONDS",
        help=f"cap on any single wait, Retry-After included (default: {_DEFAULTS.max_wait:g})",
    )
    p.add_argument(
        "--user-agent",
        default=_DEFAULTS.user_agent,
        metavar="UA",
        help="User-Agent header; Wikimedia asks for a tool name and contact, e.g. "
        "'myproject/1.0 (me@example.org)' (default: a flagsim UA without contact)",
    )
    p.add_argument(
        "--allow-host",
        dest="allow_hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="allow this host even though it resolves to a loopback/private address "
        "(repeatable; for tests and local mirrors)",
    )
    p.add_argument(
        "--allow-private",
        action="store_true",
        help="allow every loopback/private/link-local address (tests only; unsafe otherwise)",
    )


def download_options_from_args(args: argparse.Namespace) -> ScrapeOptions:
    """ScrapeOptions from the download options alone (the page options keep their defaults)."""
    return ScrapeOptions(
        concurrency=args.concurrency,
        timeout=args.timeout,
        deadline=args.deadline,
        max_bytes=args.max_bytes,
        retries=args.retries,
        backoff=args.backoff,
        max_wait=args.max_wait,
        user_agent=args.user_agent,
        allow_private=args.allow_private,
        allow_hosts=tuple(args.allow_hosts),
    )


def options_from_args(args: argparse.Namespace) -> ScrapeOptions:
    return ScrapeOptions(
        url=args.url,
        width=args.width,
        exact_width=args.exact_width,
        de_facto=args.de_facto,
        extra_flags=args.extra_flags,
        concurrency=args.concurrency,
        timeout=args.timeout,
        deadline=args.deadline,
        max_bytes=args.max_bytes,
        retries=args.retries,
        backoff=args.backoff,
        max_wait=args.max_wait,
        user_agent=args.user_agent,
        allow_private=args.allow_private,
        allow_hosts=tuple(args.allow_hosts),
    )


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    check_writable(args.out)
    result = scrape(args.out, opts)
    failed = len(result.errors)
    print(
        f"{result.table.num_rows} of {result.listed} flags -> {result.images_table} "
        f"(downloaded {result.downloaded}, unchanged {result.unchanged}, "
        f"already present {result.reused}, failed {failed}"
        + (f": see {result.errors_csv}" if failed else "")
        + ")"
    )
    return 1 if failed and args.strict else 0
