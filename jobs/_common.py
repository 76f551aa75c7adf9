"""Shared plumbing of the Ray job entry points: arguments, fail-fast validation, Ray connection.

Every job validates its whole configuration (schema, model names, resource requests, output
location) before it imports Ray, so a bad config costs a second and one line on stderr, and no
Ray session is ever started for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flagsim.config import Config, check_writable, load_config
from flagsim.errors import ConfigError, DataError, FlagsimError

log = logging.getLogger("flagsim.jobs")


@dataclass(frozen=True)
class Job:
    """A validated job: its config (run_dir resolved) and the models it works on."""

    cfg: Config
    run_dir: str
    models: tuple[str, ...]
    args: argparse.Namespace


# --- arguments ---------------------------------------------------------------------------------

def parser(
    prog: str, description: str, *, models: bool = True, run_dir: bool = True
) -> argparse.ArgumentParser:
    """`--config YAML`, repeatable `--set key=value`, `--out/--run RUN_DIR`, `--models A,B`."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", metavar="YAML", help="run configuration (default: built-in defaults)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set embed.models=[pixels] (repeatable)",
    )
    if run_dir:
        p.add_argument(
            "--out", "--run", dest="run_dir", metavar="RUN_DIR",
            help="run directory: a local path or a URI such as s3://bucket/run (default: run_dir)",
        )
    if models:
        p.add_argument(
            "--models", type=_split_csv, default=None, metavar="A,B",
            help="comma-separated models (default: the config's embed.models)",
        )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p


def _split_csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# --- validation (no Ray) -----------------------------------------------------------------------

def load_job(args: argparse.Namespace) -> Job:
    """Load and validate the config with its overrides; check resources and the output location."""
    cfg = load_config(args.config, list(args.overrides or []))
    run_dir = args.run_dir or cfg.run_dir
    if run_dir != cfg.run_dir:
        cfg = cfg.model_copy(update={"run_dir": run_dir})
    explicit = getattr(args, "models", None)
    models = tuple(explicit) if explicit else tuple(cfg.embed.models)
    if explicit:
        from flagsim.models import check_model_names

        try:
            check_model_names(models)
        except FlagsimError as exc:
            raise ConfigError(f"--models: {exc}") from None
    check_resources(cfg, models)
    check_output(run_dir)
    return Job(cfg=cfg, run_dir=run_dir, models=models, args=args)


def _ray_address(cfg: Config) -> str | None:
    return os.environ.get("RAY_ADDRESS") or cfg.ray.address


def _gpus_per_actor(cfg: Config, model: str, device: str) -> float:
    """What the embed stage asks Ray for: the setting, else one whole GPU per actor on CUDA."""
    n = cfg.embed.for_model(model).num_gpus
    if device == "cuda" and n == 0:
        return 1.0
    return n if device != "cpu" else 0.0


def check_resources(cfg: Config, models: Sequence[str]) -> None:
    """Reject resource requests no Ray cluster can satisfy, or that contradict the config itself.

    With an embedded local Ray whose size the config fixes (`ray.num_cpus` / `ray.num_gpus`),
    the actor pools must also fit that size: every model's pool runs at the same time.
    """
    local = _ray_address(cfg) is None
    device = cfg.embed.device
    gpus_total = 0.0
    cpus_total = 0.0
    for name in dict.fromkeys([*models, *cfg.embed.model_settings]):
        m = cfg.embed.for_model(name)
        key = f"embed.settings.{name}" if name in cfg.embed.model_settings else "embed.defaults"
        if m.num_gpus > 1 and not float(m.num_gpus).is_integer():
            raise ConfigError(
                f"{key}.num_gpus is {m.num_gpus:g}: Ray only splits a GPU below 1 (use 0.5, 1, 2...)"
            )
        if device == "cpu" and m.num_gpus > 0:
            raise ConfigError(f"{key}.num_gpus is {m.num_gpus:g} but embed.device is cpu")
    for name in models:
        m = cfg.embed.for_model(name)
        key = f"model {name}:"
        if local and cfg.ray.num_gpus is not None:
            local_device = device if device != "auto" else ("cuda" if cfg.ray.num_gpus else "cpu")
            per_actor = _gpus_per_actor(cfg, name, local_device)
            if per_actor > cfg.ray.num_gpus:
                raise ConfigError(
                    f"{key} num_gpus={per_actor:g} per actor but the local Ray has "
                    f"ray.num_gpus={cfg.ray.num_gpus}"
                )
            gpus_total += per_actor * m.num_actors
        if local and cfg.ray.num_cpus is not None and m.num_cpus is not None:
            if m.num_cpus + min(cfg.ray.read_cpus, 1.0) > cfg.ray.num_cpus:
                raise ConfigError(
                    f"{key} num_cpus={m.num_cpus:g} per actor but the local Ray has ray.num_cpus="
                    f"{cfg.ray.num_cpus} (and reading keeps {min(cfg.ray.read_cpus, 1.0):g})"
                )
            cpus_total += m.num_cpus * m.num_actors
    if local and device == "cuda" and cfg.ray.num_gpus == 0:
        raise ConfigError("embed.device is cuda but the local Ray has ray.num_gpus=0")
    if local and cfg.ray.num_gpus is not None and gpus_total > cfg.ray.num_gpus:
        raise ConfigError(
            f"the actor pools need {gpus_total:g} GPUs at once (num_gpus x num_actors over all "
            f"models) but the local Ray has ray.num_gpus={cfg.ray.num_gpus}"
        )
    reading = min(cfg.ray.read_cpus, 1.0)
    if local and cfg.ray.num_cpus is not None and cpus_total + reading > cfg.ray.num_cpus:
        raise ConfigError(
            f"the actor pools need {cpus_total:g} CPUs at once (num_cpus x num_actors over all "
            f"models) plus reading, but the local Ray has ray.num_cpus={cfg.ray.num_cpus}"
        )


def check_output(run_dir: str) -> None:
    """Fail now if the run directory cannot be written: local permissions, or a probe object."""
    from flagsim.storage import Location, is_uri

    if not is_uri(run_dir):
        check_writable(run_dir)
        return
    try:
        root = Location.parse(run_dir)
        probe = root / f".flagsim-write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.delete()
    except (OSError, FlagsimError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"output {run_dir} is not writable: {reason}") from None


def check_input(location: str, what: str) -> None:
    """Fail now if an input file or directory (local or URI) does not exist."""
    from flagsim.storage import Location

    try:
        exists = Location.parse(location).exists()
    except OSError as exc:
        raise DataError(f"{what} {location} cannot be read: {str(exc).splitlines()[0]}") from None
    if not exists:
        raise DataError(f"{what} not found: {location}")


# --- Ray ---------------------------------------------------------------------------------------

def connect(job: Job, *, embed_models: Sequence[str] | None = None) -> dict[str, float]:
    """Connect to Ray (RAY_ADDRESS, else ray.address, else an embedded local Ray) and check fit.

    `embed_models` (default: the job's models) are those whose actor pools will be requested;
    when a local Ray can never host them this fails before any work is scheduled.
    """
    from flagsim.pipeline.ray_session import ensure_ray

    resources = ensure_ray(job.cfg)
    models = tuple(embed_models if embed_models is not None else job.models)
    device = job.cfg.embed.device
    if device == "auto":
        device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"
    need = sum(
        _gpus_per_actor(job.cfg, m, device) * job.cfg.embed.for_model(m).num_actors for m in models
    )
    have = resources.get("GPU", 0.0)
    where = _ray_address(job.cfg) or "the local Ray"
    if need > have + 1e-9:
        msg = (
            f"the actor pools need {need:g} GPUs at once but {where} has {have:g}; lower "
            "embed.settings.<model>.num_actors or num_gpus"
        )
        if _ray_address(job.cfg) is None:
            raise ConfigError(msg)
        log.warning("%s (waiting for the autoscaler to add GPU nodes)", msg)
    log.info("Ray: %g CPUs, %g GPUs (%s)", resources.get("CPU", 0), have, where)
    return resources


# --- running -----------------------------------------------------------------------------------

def setup_logging(verbose: int = 0) -> None:
    """Plain one-line log records on stderr (job logs are read as text, not a terminal)."""
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
        force=True,
    )
    if verbose < 2:
        for noisy in ("ray", "urllib3", "filelock", "httpx", "huggingface_hub", "transformers"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")).strip()
    return text or type(exc).__name__


def main(prog: str, p: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int]) -> None:
    """Parse arguments, run `body`, and exit: 0 ok, 1 partial failure, 2 a one-line error."""
    args = p.parse_args()
    setup_logging(args.verbose)
    try:
        rc = body(args)
    except FlagsimError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; submit the same job again to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(rc or 0))
