"""Command-line options shared by `flagsim <command>` and the Ray jobs in jobs/, defined once.

`--run RUN_DIR` is the run directory everywhere; `--out` names a produced file or folder. The
old `--out RUN_DIR` of `embed`/`pipeline` (and of the embed/index/neighbours/pipeline jobs) still
works and adds one deprecation line once the command has run.
"""

from __future__ import annotations

import argparse

from flagsim.config import Config, check_writable, load_config

RUN_HELP = "run directory: a local path or a URI such as s3://bucket/run"


def split_csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def split_names(text: str) -> list[str]:
    """Comma-separated names, where a name holding a comma is double-quoted as in a CSV row:
    `'"Korea, South",Chad'` is two names (a plain split made three, none of them real)."""
    import csv

    try:
        (row,) = list(csv.reader([text], skipinitialspace=True)) or [[]]
    except (csv.Error, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot split {text!r} into names: {exc}") from None
    return [t.strip() for t in row if t.strip()]


class _DeprecatedRunOut(argparse.Action):
    """`--out RUN_DIR` where `--run RUN_DIR` is meant: stored as run_dir, noted for a warning."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        notes = list(getattr(namespace, "deprecations", None) or [])
        notes.append(f"{parser.prog}: --out RUN_DIR is deprecated, use --run RUN_DIR")
        namespace.deprecations = notes


def add_config_args(p: argparse.ArgumentParser) -> None:
    """`--config YAML` and repeatable `--set key=value`."""
    p.add_argument("--config", metavar="YAML", help="run configuration (default: built-in defaults)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set embed.models=[pixels] (repeatable)",
    )


def add_run_arg(
    p: argparse.ArgumentParser, required: bool = False, deprecated_out: bool = False
) -> None:
    """`--run RUN_DIR`; with `deprecated_out`, `--out RUN_DIR` too (a deprecation line)."""
    p.add_argument(
        "--run", dest="run_dir", required=required, metavar="RUN_DIR",
        help=RUN_HELP + ("" if required else " (default: the config's run_dir)"),
    )
    if deprecated_out:
        p.add_argument("--out", dest="run_dir", action=_DeprecatedRunOut, metavar="RUN_DIR",
                       help="deprecated spelling of --run")
    p.set_defaults(deprecations=[])


def add_models_arg(p: argparse.ArgumentParser, help_: str = "comma-separated model names") -> None:
    p.add_argument("--models", type=split_csv, default=None, metavar="A,B", help=help_)


def add_run_options(
    p: argparse.ArgumentParser, models: str | None = None, deprecated_out: bool = False
) -> None:
    """The options of every command that works on a run: --run, --config/--set, and --models
    (with `models` as its help) where the command takes it."""
    add_run_arg(p, deprecated_out=deprecated_out)
    add_config_args(p)
    if models is not None:
        add_models_arg(p, models)


def add_embed_args(p: argparse.ArgumentParser, force_help: str) -> None:
    """`--images TABLE` and `--force`, as embed and pipeline (command and job) take them."""
    p.add_argument("--images", metavar="TABLE",
                   help="images table (.parquet or a run directory, path or URI) to embed; "
                   "default: the run's own, else the config's images source")
    p.add_argument("--force", action="store_true", help=force_help)


def config_from_args(args: argparse.Namespace, extra: dict | None = None) -> Config:
    """The config named by --config with --set overrides, then `extra` (dotted keys, from the
    command's own options) applied."""
    overrides: list[str] = list(getattr(args, "overrides", []) or [])
    cfg = load_config(getattr(args, "config", None), overrides)
    return with_values(cfg, extra, source="options") if extra else cfg


#: the command-line option behind each dotted key an option sets (for its error line)
OPTION_OF = {"neighbours.k": "-k", "report.k": "-k", "index.kind": "--kind",
             "embed.shard_size": "--shard-size"}


def with_values(cfg: Config, extra: dict, source: str = "arguments") -> Config:
    """`cfg` with the dotted keys of `extra` set (None values left alone), validated again; a
    bad value from an option is named by that option (`-k: ...`), not by its config key."""
    data = cfg.model_dump(by_alias=True)
    for dotted, value in extra.items():
        if value is None:
            continue
        cur = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
    from pydantic import ValidationError

    from flagsim.config import ConfigError, _format_error

    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        dotted = ".".join(str(p) for p in err.get("loc", ()))
        if source == "options" and dotted in OPTION_OF and extra.get(dotted) is not None:
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            raise ConfigError(f"{OPTION_OF[dotted]} {extra[dotted]}: {msg}") from None
        raise ConfigError(_format_error(exc, "arguments")) from None


def run_dir_from(args: argparse.Namespace, cfg: Config, writable: bool = False) -> str:
    """--run, else the config's run_dir; with `writable`, checked to be writable (local)."""
    run_dir = getattr(args, "run_dir", None) or cfg.run_dir
    if writable:
        check_writable(run_dir)
    return run_dir
