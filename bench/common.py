"""Shared helpers for the benchmarks: machine facts, timing, memory sampling, result records."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a missing optional package is reported as None
        return None
    return str(getattr(mod, "__version__", "unknown"))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD flags that matter for sgemm speed (avx2, fma, avx512f, ...)."""
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """The machine and library versions every benchmark ran on."""
    import psutil

    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for mod in ("torch", "torchvision", "transformers", "ray", "faiss", "numpy", "PIL", "pyarrow"):
        info[mod if mod != "PIL" else "pillow"] = _version(mod)
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        info["cuda"] = False
        info["gpu"] = None
    return info


def process_tree_rss() -> tuple[int, int]:
    """(driver RSS, driver + all descendant processes RSS) in bytes: Ray workers included."""
    import psutil

    me = psutil.Process()
    own = me.memory_info().rss
    total = own
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return own, total


class PeakMemory:
    """Samples the RSS of this process and its descendants (Ray raylet, workers) in a thread.

    `baseline_*` is the reading when sampling starts; `peak_*` the maximum seen; `*_tree` counts
    the driver plus every descendant process (shared object-store pages are counted per process).
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.baseline_driver = self.baseline_tree = 0
        self.peak_driver = self.peak_tree = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        own, tree = process_tree_rss()
        self.peak_driver = max(self.peak_driver, own)
        self.peak_tree = max(self.peak_tree, tree)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a vanished process must not kill the sampler
                continue

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.baseline_driver, self.baseline_tree = process_tree_rss()
        self.peak_driver, self.peak_tree = self.baseline_driver, self.baseline_tree
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        with contextlib.suppress(Exception):
            self._sample()

    def as_dict(self) -> dict[str, float]:
        mib = 1024**2
        return {
            "baseline_driver_mib": round(self.baseline_driver / mib, 1),
            "baseline_tree_mib": round(self.baseline_tree / mib, 1),
            "peak_driver_mib": round(self.peak_driver / mib, 1),
            "peak_tree_mib": round(self.peak_tree / mib, 1),
            "growth_tree_mib": round((self.peak_tree - self.baseline_tree) / mib, 1),
        }


def best_time(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """The fastest of `repeat` timed calls after `warmup` untimed ones, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    """`with timer() as t: ...` then t["s"] holds the elapsed seconds."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - t0


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Table:
    """One markdown table: column names and rows of already-formatted or numeric cells."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    caption: str = ""


@dataclass
class Figure:
    """One benchmark section: its tables, notes (findings), raw numbers and status."""

    key: str
    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt(x: Any, digits: int = 3) -> str:
    """Format a number for a table cell (3 significant digits), pass strings through."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def flag_files() -> list:
    """Paths of the 197 bundled real flag PNGs, sorted."""
    from flagsim.images import bundled_flags_dir

    return sorted((bundled_flags_dir() / "images").glob("*.png"))


def decoded_flags(n: int | None = None) -> list:
    """The bundled flags decoded with flagsim.decode (cycled to `n` images when n > 197)."""
    from flagsim.decode import decode_image

    files = flag_files()
    base = [decode_image(p.read_bytes()) for p in files]
    if n is None:
        return base
    return [base[i % len(base)] for i in range(n)]
