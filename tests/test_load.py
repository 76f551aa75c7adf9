"""Load: thousands of synthetic flags through `flagsim embed` lose no row and keep memory bounded."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image, ImageDraw

from flagsim.config import load_config
from flagsim.images import from_folder, read_images_table, write_images_table
from flagsim.pipeline.embed import run_embed
from flagsim.rundir import RunDir
from flagsim.shards import read_embeddings, read_manifest

log = logging.getLogger(__name__)

#: The weight-free model and the settings both measured runs share (only the image count differs).
OVERRIDES = [
    "embed.models=[pixels]",
    "embed.shard_size=1000",
    "ray.read_cpus=1",
    "ray.num_cpus=2",
    "ray.object_store_memory_gb=0.5",
]


# --- synthetic flags -----------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in rng.integers(0, 256, size=3))
    return r, g, b


def synthetic_flag(rng: np.random.Generator) -> Image.Image:
    """2-4 horizontal or vertical stripes of random colours, 64-160 px wide, sometimes a disc
    or a Nordic cross on top."""
    w = int(rng.integers(64, 161))
    h = max(16, round(w * float(rng.uniform(0.5, 0.75))))
    im = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(im)
    n = int(rng.integers(2, 5))
    vertical = bool(rng.integers(0, 2))
    span = w if vertical else h
    for i in range(n):
        a, b = i * span // n, (i + 1) * span // n - 1
        box = (a, 0, b, h - 1) if vertical else (0, a, w - 1, b)
        draw.rectangle(box, fill=_colour(rng))
    emblem = rng.random()
    if emblem < 0.25:
        r = h // 4
        cx, cy = w // 2, h // 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_colour(rng))
    elif emblem < 0.4:
        t = max(2, h // 8)
        x = w // 3
        fill = _colour(rng)
        draw.rectangle((x - t // 2, 0, x + t // 2, h - 1), fill=fill)
        draw.rectangle((0, h // 2 - t // 2, w - 1, h // 2 + t // 2), fill=fill)
    return im


def write_flags(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` synthetic flag PNGs named flag_00000.png ... in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        synthetic_flag(rng).save(folder / f"flag_{i:05d}.png", compress_level=1)
    return folder


def make_run(tmp_path: Path, label: str, count: int) -> tuple[Path, list[str]]:
    """A run directory whose images table lists `count` synthetic flags; returns (run, ids)."""
    folder = write_flags(tmp_path / f"flags_{label}", count)
    run = tmp_path / f"run_{label}"
    write_images_table(from_folder(folder), RunDir.at(run))
    ids = read_images_table(run).column("image_id").to_pylist()
    assert len(ids) == count
    return run, ids


def assert_no_row_lost(run: Path, ids: list[str], shards: int) -> None:
    """Exactly one embedding row per image of the images table, in `shards` shard files."""
    got = read_embeddings(RunDir.at(run), "pixels")
    assert len(got.ids) == len(ids)
    assert len(set(got.ids)) == len(got.ids)
    assert set(got.ids) == set(ids)
    assert got.vectors.shape[0] == len(ids) and np.isfinite(got.vectors).all()
    manifest = read_manifest(RunDir.at(run), "pixels")
    assert manifest is not None
    assert manifest.rows == len(ids) and len(manifest.shards) == shards and manifest.errors == 0
    files = sorted(p.name for p in (run / "embeddings" / "model=pixels").glob("part-*.parquet"))
    assert files == sorted(manifest.shards)
    assert not list((run / "errors").glob("embed/*.parquet"))


# --- memory of a process tree --------------------------------------------------------------------


class TreeMemory:
    """Samples, every `interval` s in a thread, the summed RSS of `root` and all its descendants
    (the job's driver, the Ray processes it started and their `ray::` workers); keeps the peak."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(root)
        self.interval = interval
        self.peak = 0
        self.root_peak = 0  # the root process alone (the job's driver)
        self.samples = 0
        self.ray_workers: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sample(self) -> int:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                total += rss
                if p is self.root:
                    self.root_peak = max(self.root_peak, rss)
                if " ".join(p.cmdline()).startswith("ray::"):
                    self.ray_workers.add(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self.sample()
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)


@dataclass
class Measured:
    images: int
    seconds: float  # wall time of the whole `flagsim embed` process (Ray start included)
    pipeline_seconds: float  # the manifest's: streaming the images through the pipeline
    peak_rss: int  # bytes, summed over the job's process tree
    driver_peak_rss: int  # bytes, the `flagsim embed` process alone
    ray_workers: int
    samples: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    def line(self) -> str:
        return (
            f"{self.images} images: {self.seconds:.1f} s wall ({self.images_per_s:.0f} images/s), "
            f"pipeline {self.pipeline_seconds:.1f} s "
            f"({self.images / self.pipeline_seconds:.0f} images/s), "
            f"peak RSS {self.peak_rss / 2**20:.0f} MB (driver {self.driver_peak_rss / 2**20:.0f} MB; "
            f"{self.ray_workers} ray:: process(es) seen), "
            f"{self.samples} samples"
        )


def embed_in_fresh_process(run: Path, log_file: Path, timeout: float = 1500) -> Measured:
    """`python -m flagsim embed` with its own embedded local Ray (same settings for every run),
    while sampling the memory of its whole process tree."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "flagsim", "embed", "--run", str(run), "--no-progress"]
    for o in OVERRIDES:
        cmd += ["--set", o]
    start = time.perf_counter()
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            with TreeMemory(proc.pid) as mem:
                rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - start
    assert rc == 0, log_file.read_text(errors="replace")[-3000:]
    manifest = read_manifest(RunDir.at(run), "pixels")
    assert manifest is not None and manifest.seconds
    return Measured(manifest.rows, seconds, manifest.seconds, mem.peak, mem.root_peak,
                    len(mem.ray_workers), mem.samples)


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.ray
def test_300_synthetic_flags_give_one_row_each_in_planned_shards(tmp_path, ray_local):
    run, ids = make_run(tmp_path, "small", 300)
    cfg = load_config(None, ["embed.models=[pixels]", "embed.shard_size=70", "ray.read_cpus=1"])
    pid = os.getpid()
    with TreeMemory(pid) as mem:
        summary = run_embed(cfg, run_dir=str(run), show_progress=False)
    result = summary.result("pixels")
    assert (result.status, result.images, result.errors) == ("embedded", 300, 0)
    assert_no_row_lost(run, ids, shards=5)  # 4 x 70 + 20
    # the sampler sees this process and the Ray workers it started
    assert mem.samples > 0 and mem.ray_workers
    assert mem.peak > psutil.Process(pid).memory_info().rss
    # a rerun finds every shard and does nothing
    again = run_embed(cfg, run_dir=str(run), show_progress=False)
    assert again.result("pixels").status == "up to date"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # on 2 shared cores: ~20k files to write and two Ray start-ups
def test_20000_images_lose_no_row_and_memory_stays_within_1_5x_of_2000(tmp_path):
    runs = {}
    for label, count in (("2k", 2_000), ("20k", 20_000)):
        t0 = time.perf_counter()
        runs[label] = make_run(tmp_path, label, count)
        log.warning("%s: generated and tabled %d images in %.1f s", label, count,
                    time.perf_counter() - t0)
    measured = {}
    for label, (run, _ids) in runs.items():  # 2k first, then 20k; each with a fresh local Ray
        measured[label] = embed_in_fresh_process(run, tmp_path / f"embed_{label}.log")
        log.warning("%s: %s", label, measured[label].line())
    for label, (run, ids) in runs.items():
        assert_no_row_lost(run, ids, shards=len(ids) // 1000)
        assert measured[label].ray_workers > 0  # the workers were part of the measurement
    small, large = measured["2k"].peak_rss, measured["20k"].peak_rss
    drivers = measured["2k"].driver_peak_rss, measured["20k"].driver_peak_rss
    log.warning("peak RSS ratio 20k / 2k = %.2f (driver alone %.2f)", large / small,
                drivers[1] / drivers[0])
    assert large <= 1.5 * small, (measured["2k"].line(), measured["20k"].line())
    # the driver buffers rows until their shard is complete: it must not grow with the image count
    assert drivers[1] <= 1.5 * drivers[0], (measured["2k"].line(), measured["20k"].line())
