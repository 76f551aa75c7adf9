"""Figure report_scale: `flagsim report` time, peak memory and page size at 10k-100k synthetic images."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Figure, PeakMemory, Table, fmt

log = logging.getLogger(__name__)

MODELS = ("synth-a", "synth-b")  # two unregistered 32-d models: the ensemble `all` is their mean
DIM = 32
K = 5
#: The stated size bound of the page for 10k images (the figure checks it).
SIZE_10K_MIB = 16.0
#: 100k images within this many times the 20k figure (same number of thumbnails drawn).
TIME_RATIO = 2.0


def make_run(root: Path, n: int, seed: int = 0, shard_rows: int = 10_000) -> Path:
    """`n` images (ids img00000000.., each pointing at a bundled flag file, cycled) with two
    clustered 32-d models' embeddings, their indexes and neighbour tables (untimed set-up)."""
    import pyarrow as pa

    from flagsim.images import bundled_table, write_images_table
    from flagsim.rundir import RunDir, shard_name
    from flagsim.search.neighbours import write_neighbours
    from flagsim.shards import Manifest, embeddings_table, write_manifest, write_shard

    run = RunDir.at(str(root))
    base = bundled_table()
    pick = np.arange(n) % base.num_rows
    table = base.take(pa.array(pick))
    ids = [f"img{i:08d}" for i in range(n)]
    names = [f"Image {i}" for i in range(n)]
    table = table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids))
    table = table.set_column(table.schema.get_field_index("name"), "name", pa.array(names))
    write_images_table(table, run)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, DIM)).astype(np.float32)
    label = rng.integers(0, 64, n)
    for m in MODELS:
        x = centres[label] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
        shards: dict[str, int] = {}
        for i, s in enumerate(range(0, n, shard_rows)):
            e = min(s + shard_rows, n)
            write_shard(run, m, i, embeddings_table(ids[s:e], names[s:e], m, x[s:e]))
            shards[shard_name(i)] = e - s
        write_manifest(run, Manifest(model=m, dim=DIM, rows=n, images_hash="synthetic", shards=shards,
                                     checkpoint="synthetic", source="bench"))
    write_neighbours(str(root), k=K)  # the tables the report reads (and `all`'s where flagsim writes it)
    return root


def measure(n: int, work: Path, thumbs_max: int) -> dict[str, Any]:
    """Build the report of an n-image run once: seconds, peak RSS, page size, what it drew."""
    from flagsim.report import build_report
    from flagsim.rundir import RunDir

    root = work / f"run{n}"
    t0 = time.perf_counter()
    make_run(root, n)
    setup_s = time.perf_counter() - t0
    from flagsim.search.session import RunSearch

    RunSearch(str(root)).index("all")  # the ensemble index built in the set-up, not in the timed part
    sources = {m: ("neighbour table" if RunDir.at(str(root)).neighbours_manifest(m).exists() else "searched")
               for m in [*MODELS, "all"]}
    out = work / f"report{n}.html"
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        build_report(str(root), queries=["Image 0", "Image 1"], k=K, out=str(out), thumbs_max=thumbs_max,
                     projection="pca")
        seconds = time.perf_counter() - t0
    size = out.stat().st_size
    ensemble_s = 0.0
    if sources["all"] == "searched":  # what the report spent searching `all` (no table for it yet)
        from flagsim.report.explore import _searched

        session = RunSearch(str(root))
        session.index("all")
        t0 = time.perf_counter()
        _searched(session, "all", session.catalogue.ids, K)
        ensemble_s = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    return {"n": n, "seconds": seconds, "ensemble_search_s": ensemble_s, "setup_s": setup_s,
            "html_mib": size / 2**20, "thumbnails": thumbs_max, "sources": sources, **mem.as_dict()}


def measure_fresh(n: int, work: Path, thumbs_max: int) -> dict[str, Any]:
    """`measure` in a fresh interpreter, so that its peak memory is this size's alone."""
    proc = subprocess.run([sys.executable, "-m", "bench.report_scale", str(n), str(work), str(thumbs_max)],
                          capture_output=True, text=True, check=False, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"report of {n} images failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(sizes: tuple[int, ...] = (10_000, 20_000, 100_000), thumbs_max: int = 1000) -> Figure:
    """The report at each size (same thumbnail count): time, peak memory, page size; checks
    100k <= TIME_RATIO x 20k and the 10k page below SIZE_10K_MIB."""
    work = Path(tempfile.mkdtemp(prefix="flagsim-report-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        for n in sizes:
            log.info("report_scale: %d images", n)
            rows.append(measure_fresh(n, work, thumbs_max))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_n = {r["n"]: r for r in rows}
    table = Table(["images", "report s", "of which searching `all` s", "peak RSS MiB (driver)", "driver growth MiB", "page MiB", "thumbnails",
                   "top-k source (synth-a, synth-b, all)"],
                  caption=f"`build_report` of a run of two {DIM}-d models, k={K}, maps sampled to 5,000 "
                          f"images, {thumbs_max} thumbnails embedded; neighbour tables written beforehand.")
    for r in rows:
        table.rows.append([fmt(r["n"]), fmt(r["seconds"]), fmt(r["ensemble_search_s"]), fmt(r["peak_driver_mib"]), fmt(r["peak_driver_mib"] - r["baseline_driver_mib"]),
                           fmt(r["html_mib"]), fmt(r["thumbnails"]), ", ".join(r["sources"].values())])
    notes = []
    if 20_000 in by_n and 100_000 in by_n:
        ratio = by_n[100_000]["seconds"] / by_n[20_000]["seconds"]
        mem_ratio = by_n[100_000]["peak_driver_mib"] / by_n[20_000]["peak_driver_mib"]
        notes.append(f"100k / 20k: time x{ratio:.2f} (target <= {TIME_RATIO:g}: "
                     f"{'met' if ratio <= TIME_RATIO else 'not met'}), peak memory x{mem_ratio:.2f}.")
        a, b = (by_n[x]["seconds"] - by_n[x]["ensemble_search_s"] for x in (20_000, 100_000))
        if by_n[100_000]["ensemble_search_s"]:
            notes.append(f"Without searching `all` (the run has no `all` neighbour table; a pipeline that "
                         f"writes one removes that search): 100k / 20k x{b / a:.2f}.")
    if 10_000 in by_n:
        size = by_n[10_000]["html_mib"]
        notes.append(f"10k-image page: {size:.1f} MiB (stated bound {SIZE_10K_MIB:g} MiB: "
                     f"{'met' if size < SIZE_10K_MIB else 'not met'}).")
    return Figure("report_scale", "Report time, memory and size at scale", tables=[table], notes=notes,
                  raw={"rows": rows})


if __name__ == "__main__":  # one size, in its own process: python -m bench.report_scale N WORK THUMBS
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(measure(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))))
