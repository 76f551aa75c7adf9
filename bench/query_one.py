"""Figure `query_one`: `flagsim query NAME` at 300k images reads only what one query needs.

A run of N clustered vectors (flagsim's own shard and manifest code), its index built by
`flagsim index` with the default settings (`kind: auto`), then `flagsim query NAME` run as a
subprocess several times: wall time and peak memory (kernel high-water mark of the process, and
its private USS at the end is not needed: RSS counts the memory-mapped index pages it touched).
Targets (issue 13): under 1 GB and about 1 s at 300k on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Figure, Table, fmt
from bench.targets import QUERY_RSS_MIB, QUERY_WALL_S

log = logging.getLogger(__name__)

def run(sizes: tuple[tuple[int, int], ...] = ((300_000, 256), (300_000, 1152)), repeat: int = 3,
        workdir: str | None = None) -> Figure:
    from bench.knn import model_of_dim, write_run
    from bench.search_scale import Clusters, _env, flagsim_cmd, measure

    fig = Figure("query_one", "Query by name: one vector read, a memory-mapped index")
    table = Table(["N x d", "index kind", "index build s", "query wall s (best / median)",
                   "query peak RSS MiB", "verdict RSS", "verdict wall"])
    raw: list[dict[str, Any]] = []
    for n, d in sizes:
        with tempfile.TemporaryDirectory(dir=workdir, prefix="query-one-") as tmp:
            run_dir = str(Path(tmp) / "run")
            model = model_of_dim(d)
            gen = Clusters(d, n_clusters=1000, seed=0)
            write_run(run_dir, model, np.concatenate([x for _, x in gen.rows(n)]), shard_rows=10_000)
            t0 = time.perf_counter()
            built = measure(flagsim_cmd("index", "--run", run_dir), env=_env())
            build_s = time.perf_counter() - t0
            idx = Path(run_dir) / "index" / f"model={model}" / "_manifest.json"
            manifest = json.loads(idx.read_text())
            walls, peaks = [], []
            for r in range(repeat):
                m = measure(flagsim_cmd("query", f"img{(r * 7919) % n:08d}", "--run", run_dir,
                                        "--model", model, "-k", "10"), env=_env())
                if m.rc != 0:
                    raise RuntimeError(f"flagsim query failed: {m.stderr_tail[-500:]}")
                walls.append(m.wall_s)
                peaks.append(m.peak_driver_mib)
            walls.sort()
            rec = {"n": n, "d": d, "kind": manifest["kind"], "build_s": build_s, "build_rc": built.rc,
                   "walls": walls, "peaks_mib": peaks, "load": os.getloadavg()[0]}
            raw.append(rec)
            table.rows.append([f"{n:,} x {d}", manifest["kind"], fmt(build_s),
                               f"{fmt(walls[0])} / {fmt(walls[len(walls) // 2])}", fmt(max(peaks)),
                               QUERY_RSS_MIB.verdict(max(peaks)), QUERY_WALL_S.verdict(walls[0])])
    fig.tables.append(table)
    fig.raw = {"rows": raw}
    fig.notes.append(
        "Each query is a fresh `flagsim query` process (Python start-up and imports included): it "
        "loads the index memory-mapped, reads the id table, resolves the name with Arrow, takes "
        "the one stored vector (reconstructed from a flat index, else read from the one shard "
        "holding it) and searches. RSS includes the mapped index pages the search touches: all "
        "of them for an exact (flat) index, the probed lists for IVF.")
    return fig
