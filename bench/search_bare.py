"""The bare FAISS baseline of figure 8: one process, all-vs-all top-k of a Parquet vector table.

    python -m bench.search_bare --source DIR --factory IVF1264,Flat --nprobe 32 -k 10 --out ids.npy

Reads the same Parquet parts that were imported into flagsim (columns id and vector), L2-normalises,
builds `faiss.index_factory(d, FACTORY, METRIC_INNER_PRODUCT)`, trains IVF kinds on a seeded sample
of `--train` rows, adds and searches every vector with top-(k+1), the vector itself dropped, and
saves the neighbour positions (int32, N x k) to `--out`. Its phase times go to stdout as JSON.
Only numpy, pyarrow and faiss are imported, so its RSS is the index plus one batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def parts(source: Path) -> list[Path]:
    """The Parquet parts of `source`, in path order."""
    return sorted(p for p in source.rglob("*.parquet") if not p.name.startswith(("_", ".")))


def batches(source: Path, column: str, batch_rows: int) -> Iterator[np.ndarray]:
    """L2-normalised float32 row blocks of at most `batch_rows`, streamed from the parts."""
    import pyarrow.parquet as pq

    for path in parts(source):
        with pq.ParquetFile(path) as f:
            for rb in f.iter_batches(batch_size=batch_rows, columns=[column]):
                col = rb.column(0)
                d = len(col[0]) if len(col) else 0
                x = np.array(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)
                x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                yield x


def count_rows(source: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts(source))


def train_positions(n: int, ntrain: int, recall_sample: int = 1000) -> np.ndarray:
    """Sorted training rows, drawn like flagsim.index draws them today (seed 0, after the recall
    sample), so both processes train the same quantiser when the draw is unchanged."""
    rng = np.random.default_rng(0)
    rng.choice(n, size=min(recall_sample, n), replace=False)
    return np.sort(rng.choice(n, size=min(ntrain, n), replace=False))


def run(source: Path, factory: str, nprobe: int | None, k: int, out: Path, ntrain: int,
        column: str = "vector", batch_rows: int = 4096) -> dict[str, float]:
    import faiss

    t0 = time.perf_counter()
    n = count_rows(source)
    first = next(batches(source, column, 1))
    d = first.shape[1]
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    times: dict[str, float] = {"n": n, "d": d, "threads": faiss.omp_get_max_threads()}
    if not index.is_trained:
        pos = train_positions(n, ntrain)
        train = np.empty((len(pos), d), np.float32)
        seen = got = 0
        for x in batches(source, column, batch_rows):
            sel = pos[(pos >= seen) & (pos < seen + len(x))] - seen
            train[got:got + len(sel)] = x[sel]
            got += len(sel)
            seen += len(x)
        t1 = time.perf_counter()
        index.train(train)
        del train
        times["train_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    for x in batches(source, column, batch_rows):
        index.add(x)
    times["add_s"] = time.perf_counter() - t1
    if nprobe:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    result = np.empty((n, k), np.int32)
    t1 = time.perf_counter()
    start = 0
    for q in batches(source, column, batch_rows):
        _, pos = index.search(q, k + 1)
        own = np.arange(start, start + len(q))[:, None]
        drop = pos == own
        drop[~drop.any(axis=1), -1] = True  # the query was not returned: drop the last
        order = np.argsort(drop, axis=1, kind="stable")
        result[start:start + len(q)] = np.take_along_axis(pos, order, 1)[:, :k]
        start += len(q)
    times["search_s"] = time.perf_counter() - t1
    np.save(out, result)
    times["total_s"] = time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, type=Path)
    p.add_argument("--factory", required=True)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--train", type=int, default=0, help="training rows (IVF kinds)")
    p.add_argument("--column", default="vector")
    p.add_argument("--batch-rows", type=int, default=4096)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    times = run(a.source, a.factory, a.nprobe, a.k, a.out, a.train, a.column, a.batch_rows)
    sys.stdout.write(json.dumps(times) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
