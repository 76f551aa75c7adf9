"""The `flagsim` command line: one subcommand module per verb under `flagsim.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

from flagsim import __version__
from flagsim.app import logs
from flagsim.app.entry import os_error_line, run_guarded
from flagsim.console import log_handler

__all__ = ["COMMANDS", "build_parser", "main", "os_error_line"]

#: Subcommands in the order `--help` lists them: name -> (module under flagsim.commands, help).
#: A command's module (and what it imports: Ray, torch, the scraper, pydantic) is imported only
#: when that command runs or shows its own --help, so `flagsim --help` stays fast. Each module
#: has `add_parser(sub)` and `run(args)`; its parser's `help` must equal the one here.
COMMANDS: dict[str, tuple[str, str]] = {
    "scrape": ("scrape", "download the flags of Wikipedia's 'List of national flags of sovereign states'"),
    "images": ("images", "build the images table (images.parquet) from a folder, a CSV, webdataset shards, "
                          "Parquet, a URL list or the bundled flags"),
    "embed": ("embed", "embed the run's images with each model (Ray Data actor pools) into Parquet shards"),
    "import-csv": ("import_csv",
                   "import embeddings saved by the original notebook (Country,Flag Image,features)"),
    "import-embeddings": ("import_embeddings",
                          "import embeddings made elsewhere (a Parquet table, or clip-retrieval's output)"),
    "index": ("index",
              "build a FAISS cosine index per model and for their ensemble 'all' (exact by "
              "default; IVF/HNSW/IVF-PQ for large runs)"),
    "neighbours": ("neighbours", "write the top-k neighbours of every image for every model (Parquet)"),
    "search": ("search",
               "search a table of images (or embeddings) in a run's indexes: top-k of every query (Parquet)"),
    "query": ("query", "show the top-k most similar images of a name or an image file, per model"),
    "compare": ("compare", "compare models: top-k per query per model, the ensemble, and model agreement"),
    "dedup": ("dedup", "find groups of near-duplicate images (neighbour pairs with cosine >= a threshold)"),
    "eval": ("eval", "score each model (and the ensemble) on a labelled file of visually similar images"),
    "report": ("report",
               "write an HTML report (query flags, top-k per model, agreement, evaluation) and a PNG"),
    "pipeline": ("pipeline",
                 "embed, index, neighbour tables and report in one go (what `make embed-all` runs)"),
    "models": ("models", "list the registered models and whether their weights are available offline"),
}

def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser. Only the commands in `load` (default: all) get their full parser; the
    others are listed in `--help` by name and help line without importing their module."""
    wanted = set(COMMANDS) if load is None else set(load)
    parser = argparse.ArgumentParser(
        prog="flagsim",
        description="Embed images with several vision models on Ray, index them with FAISS, "
        "and find similar images.",
    )
    parser.add_argument("--version", action="version", version=f"flagsim {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_) in COMMANDS.items():
        if name not in wanted:
            sub.add_parser(name, help=help_, add_help=False)
            continue
        module = importlib.import_module(f"flagsim.commands.{module_name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv`: the first argument that is not an option (the global
    options take no values)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    logs.setup_logging(verbose, quiet, handler=log_handler(verbose))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # Ctrl-C while the command's modules load and its arguments are parsed: no traceback
        command = command_in(argv)
        parser = build_parser([command] if command in COMMANDS else [])
        args = parser.parse_args(argv)
        setup_logging(args.verbose, args.quiet)
    except KeyboardInterrupt:
        print("flagsim: interrupted", file=sys.stderr)
        return 130
    return run_guarded("flagsim", args._run, args, "rerun the same command to resume")

if __name__ == "__main__":
    raise SystemExit(main())
