"""The `flagsim` command line: one subcommand module per verb under `flagsim.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from flagsim import __version__
from flagsim.errors import FlagsimError

#: Subcommand modules, in the order `--help` lists them. Each has `add_parser(sub)` and `run(args)`.
COMMANDS = (
    "scrape",
    "images",
    "embed",
    "import_csv",
    "index",
    "neighbours",
    "query",
    "compare",
    "eval",
    "report",
    "pipeline",
    "models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flagsim",
        description="Embed images with several vision models on Ray, index them with FAISS, "
        "and find similar images.",
    )
    parser.add_argument("--version", action="version", version=f"flagsim {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"flagsim.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            show_path=False, rich_tracebacks=False, console=_stderr_console()
        )
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    if verbose < 2:
        for noisy in ("ray", "urllib3", "filelock", "httpx", "huggingface_hub", "transformers", "faiss"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        result = args._run(args)
    except FlagsimError as exc:
        print(f"flagsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("flagsim: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
