"""Connect to a Ray cluster, or start an embedded local one, once per process."""

from __future__ import annotations

import logging
import os

from flagsim.config import Config

log = logging.getLogger(__name__)


def ensure_ray(cfg: Config) -> dict[str, float]:
    """Initialise Ray if needed (RAY_ADDRESS, then cfg.ray.address, else local); return its resources."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
        kwargs: dict = {
            "log_to_driver": False,
            "configure_logging": False,
            "include_dashboard": False if address is None else None,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if address is None:
            if cfg.ray.num_cpus is not None:
                kwargs["num_cpus"] = cfg.ray.num_cpus
            if cfg.ray.num_gpus is not None:
                kwargs["num_gpus"] = cfg.ray.num_gpus
            if cfg.ray.object_store_memory_gb is not None:
                kwargs["object_store_memory"] = int(cfg.ray.object_store_memory_gb * 1024**3)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            log.info("starting an embedded local Ray")
        else:
            log.info("connecting to Ray at %s", address)
            kwargs["address"] = address
        ray.init(**kwargs)
    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


def quiet_ray_data(show_ray_progress: bool = False) -> None:
    """Keep Ray Data's console chatter (per-operator progress logs) out of the user's terminal.

    Its full logs still go to the Ray session's `ray-data.log`; `-vv` keeps the console output.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_ray_progress
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
