"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse

from flagsim.config import Config, check_writable, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="run configuration (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set embed.shard_size=500 (repeatable)",
    )


def add_run_arg(p: argparse.ArgumentParser, required: bool = False, flag: str = "--run") -> None:
    p.add_argument(
        flag,
        dest="run_dir",
        required=required,
        metavar="RUN_DIR",
        help="run directory: a local path or a URI such as s3://bucket/run"
        + ("" if required else " (default: the config's run_dir)"),
    )


def add_models_arg(p: argparse.ArgumentParser, help_: str = "comma-separated model names") -> None:
    p.add_argument("--models", type=split_csv, default=None, metavar="A,B", help=help_)


def split_csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def config_from_args(args: argparse.Namespace, extra: dict | None = None) -> Config:
    """The config named by --config with --set overrides, then `extra` (dotted keys) applied."""
    overrides: list[str] = list(getattr(args, "overrides", []) or [])
    cfg = load_config(getattr(args, "config", None), overrides)
    return with_values(cfg, extra) if extra else cfg


def with_values(cfg: Config, extra: dict) -> Config:
    """`cfg` with the dotted keys of `extra` set (None values left alone), validated again."""
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
        raise ConfigError(_format_error(exc, "arguments")) from None


def run_dir_from(args: argparse.Namespace, cfg: Config, writable: bool = False) -> str:
    run_dir = getattr(args, "run_dir", None) or cfg.run_dir
    if writable:
        check_writable(run_dir)
    return run_dir
