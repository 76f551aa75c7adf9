"""Logging set-up of the CLI and the jobs: one handler on stderr, other libraries kept quiet."""

from __future__ import annotations

import logging
import sys

#: Libraries whose INFO records are routine; shown only at -vv.
NOISY = ("ray", "urllib3", "filelock", "httpx", "huggingface_hub", "transformers", "faiss")

#: Job logs are read as text, not on a terminal: a timestamp and the logger on every line.
JOB_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: int = 0, quiet: bool = False, handler: logging.Handler | None = None) -> None:
    """INFO (DEBUG at -vv, WARNING with `quiet`) to `handler`, else plain job-log lines on stderr."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(JOB_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if verbose < 2:
        for noisy in NOISY:
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
