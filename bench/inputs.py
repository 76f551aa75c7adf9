"""Figure 8: input sources at scale: images-table build (rate, driver memory) and embed rate,
webdataset shards and Parquet next to a folder of files."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Figure, Table, fmt

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_SHARD = 10_000

#: Run in a fresh interpreter per build, so that each peak RSS is that build's alone.
_BUILD = r"""
import json, sys, time
import psutil
from flagsim.rundir import RunDir
from flagsim import images, sources
kind, src, out = sys.argv[1:4]
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
run = RunDir.at(out)
if kind == "folder":
    table = images.from_folder(src)
    images.write_images_table(table, run)
    rows, parts = table.num_rows, 1
elif kind == "webdataset":
    w = sources.from_webdataset(src, run)
    rows, parts = w.rows, len(w._parts)
else:
    w = sources.from_parquet(src, "image", run, id_column="key")
    rows, parts = w.rows, len(w._parts)
s = time.perf_counter() - t0
# VmHWM (not ru_maxrss, which keeps the forking parent's peak across exec)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"rows": rows, "parts": parts, "s": s, "base_mib": base / 2**20,
                  "peak_mib": peak / 2**20}))
"""


def tiny_images(n_distinct: int = 64, seed: int = 0) -> list[tuple[str, bytes]]:
    """Small synthetic flag-like images (24x16 px, stripes), half PNG and half JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_distinct):
        arr = np.zeros((16, 24, 3), np.uint8)
        for s in range(3):
            arr[:, s * 8:(s + 1) * 8] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        fmt_ = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
        Image.fromarray(arr).save(buf, fmt_[1])
        out.append((fmt_[0], buf.getvalue()))
    return out


def write_shards(folder: Path, n: int, imgs: list[tuple[str, bytes]]) -> str:
    """n samples (image + .txt caption) in tar shards of SAMPLES_PER_SHARD; the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = (n + SAMPLES_PER_SHARD - 1) // SAMPLES_PER_SHARD
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tf:
            for i in range(s * SAMPLES_PER_SHARD, min(n, (s + 1) * SAMPLES_PER_SHARD)):
                ext, data = imgs[i % len(imgs)]
                for name, body in ((f"{i:07d}.{ext}", data), (f"{i:07d}.txt", f"image {i}".encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(body)
                    tf.addfile(ti, io.BytesIO(body))
    return str(folder / f"shard-{{00000..{shards - 1:05d}}}.tar")


def write_parquet(path: Path, n: int, imgs: list[tuple[str, bytes]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("image", pa.binary())])) as w:
        for start in range(0, n, 10_000):
            idx = range(start, min(n, start + 10_000))
            w.write_table(pa.table({"key": [f"{i:07d}" for i in idx],
                                    "image": [imgs[i % len(imgs)][1] for i in idx]}))
    return str(path)


def write_folder(folder: Path, n: int, imgs: list[tuple[str, bytes]]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ext, data = imgs[i % len(imgs)]
        (folder / f"{i:07d}.{ext}").write_bytes(data)
    return str(folder)


def build(kind: str, src: str, out: Path) -> dict[str, Any]:
    """Build an images table in a fresh interpreter; rows, parts, seconds, RSS."""
    proc = subprocess.run([sys.executable, "-c", _BUILD, kind, src, str(out)], capture_output=True,
                          text=True, cwd=str(REPO), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} build failed: {proc.stderr.strip().splitlines()[-1:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["rows_per_s"] = r["rows"] / r["s"]
    r["growth_mib"] = r["peak_mib"] - r["base_mib"]
    return r


def run(ws, build_sizes: tuple[int, ...], embed_n: int, big_embed: bool) -> Figure:
    """Build tables of `build_sizes` rows from webdataset shards (and Parquet at the largest
    size), a folder at `embed_n`; embed `embed_n` rows from a folder and from shards with
    `pixels`, and the largest webdataset table too when `big_embed`."""
    from bench.pipeline import run_pipeline

    fig = Figure("inputs", f"8. Input sources: webdataset, Parquet and a folder, up to "
                           f"{max(build_sizes):,} images")
    imgs = tiny_images()
    root = ws.root / "inputs"
    builds: list[dict[str, Any]] = []
    tables: dict[tuple[str, int], Path] = {}

    def one(kind: str, n: int, src: str) -> None:
        out = root / "runs" / f"{kind}-{n}"
        r = build(kind, src, out)
        r.update(kind=kind, n=n)
        builds.append(r)
        tables[(kind, n)] = out / "images.parquet"
        log.info("inputs: %s %d rows built in %.1fs (peak %.0f MiB)", kind, n, r["s"], r["peak_mib"])

    for n in sorted(set(build_sizes) | {embed_n}):
        one("webdataset", n, write_shards(root / f"wds-{n}", n, imgs))
    big = max(build_sizes)
    one("parquet", big, write_parquet(root / f"pq-{big}" / "images.parquet", big, imgs))
    one("folder", embed_n, write_folder(root / f"folder-{embed_n}", embed_n, imgs))

    t = Table(["source", "rows", "parts", "build s", "rows/s", "peak RSS (MiB)",
               "growth over imports (MiB)"],
              caption="`flagsim.sources` / `flagsim.images` in a fresh interpreter per build (no "
                      "Ray): every image read, hashed and its header probed; webdataset shards of "
                      f"{SAMPLES_PER_SHARD:,} samples (image + .txt caption); tables of more than "
                      "100,000 rows are written as a folder of parts. Peak RSS is the process's "
                      "high-water mark (VmHWM); growth is over its RSS after imports.")
    for r in builds:
        t.rows.append([r["kind"], fmt(r["n"]), fmt(r["parts"]), fmt(r["s"]), fmt(r["rows_per_s"]),
                       fmt(r["peak_mib"]), fmt(r["growth_mib"])])
    fig.tables.append(t)

    embeds: dict[str, dict[str, Any]] = {}
    run_pipeline(ws, str(tables[("folder", embed_n)]), ["pixels"])  # warm-up, not measured
    cases = [("folder", embed_n), ("webdataset", embed_n)] + ([("webdataset", big)] if big_embed else [])
    for kind, n in cases:
        r = run_pipeline(ws, str(tables[(kind, n)]), ["pixels"], memory=True)
        embeds[f"{kind}-{n}"] = r
        log.info("inputs: embedded %s %d in %.1fs", kind, n, r["wall_s"])
    e = Table(["source", "images", "wall s", "img/s end-to-end", "peak RSS driver (MiB)",
               "peak RSS driver+Ray (MiB)"],
              caption="`run_embed` with `pixels` (weight-free: the read stage is what differs), "
                      "shard_size 1000, default settings, after an unmeasured warm-up run; the "
                      "webdataset rows are decoded from their tar members by offset (nothing "
                      "unpacked).")
    for kind, n in cases:
        r = embeds[f"{kind}-{n}"]
        e.rows.append([kind, fmt(n), fmt(r["wall_s"]), fmt(n / r["wall_s"]),
                       fmt(r["memory"]["peak_driver_mib"]), fmt(r["memory"]["peak_tree_mib"])])
    fig.tables.append(e)

    wds = sorted((r for r in builds if r["kind"] == "webdataset"), key=lambda r: r["n"])
    lo, hi = wds[0], wds[-1]
    growth_ratio = hi["growth_mib"] / lo["growth_mib"] if lo["growth_mib"] > 0 else float("nan")
    folder_rate = embed_n / embeds[f"folder-{embed_n}"]["wall_s"]
    wds_rate = embed_n / embeds[f"webdataset-{embed_n}"]["wall_s"]
    fig.raw = {"builds": builds, "embeds": embeds, "embed_n": embed_n,
               "build_growth_ratio": growth_ratio, "rows_ratio": hi["n"] / lo["n"],
               "embed_rate_ratio_wds_over_folder": wds_rate / folder_rate}
    fig.notes.append(
        f"Building the webdataset table: {hi['n'] / lo['n']:.0f}x the rows, memory growth "
        f"x{growth_ratio:.2f} ({fmt(lo['growth_mib'])} -> {fmt(hi['growth_mib'])} MiB): rows are "
        "staged in parts of 100,000 and only 8 bytes per row (the id hash for the uniqueness "
        "check) stay in memory.")
    fig.notes.append(
        f"Embedding {embed_n:,} images from tar shards ran at x{wds_rate / folder_rate:.2f} the "
        "rate of the same images as files in a folder.")
    return fig
