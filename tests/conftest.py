"""Shared fixtures: offline hub settings, the bundled flags, one local Ray per session."""

from __future__ import annotations

import os

# Tests never download weights: every hub call must fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "reference"


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from flagsim.images import bundled_flags_dir

    return bundled_flags_dir()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray (2 CPUs) for the whole session; pipeline tests reuse it.

    `address="local"`: always a new Ray of its own, never a head that runs on the machine."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=500 * 1024 * 1024,
        )
    yield ray
    ray.shutdown()
