"""Pre-flight checks run before any work (and before Ray): models, resources, inputs, outputs."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from flagsim.config import Config, check_writable, gpus_per_actor
from flagsim.errors import ConfigError, DataError, FlagsimError
from flagsim.pipeline.ray_session import ray_address

log = logging.getLogger(__name__)


def check_models(models: Sequence[str]) -> None:
    """Models named with --models must be registered (ConfigError naming the option)."""
    from flagsim.models import check_model_names

    try:
        check_model_names(models)
    except FlagsimError as exc:
        raise ConfigError(f"--models: {exc}") from None


def check_resources(cfg: Config, models: Sequence[str]) -> None:
    """Reject resource requests no Ray cluster can satisfy, or that contradict the config itself.

    With an embedded local Ray whose size the config fixes (`ray.num_cpus` / `ray.num_gpus`),
    the actor pools must also fit that size: every model's pool runs at the same time.
    """
    local = ray_address(cfg) is None
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
            per_actor = gpus_per_actor(m, local_device)
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


def check_fit(cfg: Config, resources: dict[str, float], models: Sequence[str]) -> None:
    """After connecting: the actor pools of `models` must fit the GPUs Ray reports. An embedded
    Ray that can never host them is an error; a cluster may still grow (a warning)."""
    device = cfg.embed.device
    if device == "auto":
        device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"
    need = sum(
        gpus_per_actor(cfg.embed.for_model(m), device) * cfg.embed.for_model(m).num_actors
        for m in models
    )
    have = resources.get("GPU", 0.0)
    where = ray_address(cfg) or "the local Ray"
    if need > have + 1e-9:
        msg = (
            f"the actor pools need {need:g} GPUs at once but {where} has {have:g}; lower "
            "embed.settings.<model>.num_actors or num_gpus"
        )
        if ray_address(cfg) is None:
            raise ConfigError(msg)
        log.warning("%s (waiting for the autoscaler to add GPU nodes)", msg)


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
