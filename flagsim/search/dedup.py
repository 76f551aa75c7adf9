"""Near-duplicate groups: connected components of neighbour pairs with cosine >= a threshold."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flagsim.config import Config
from flagsim.errors import ConfigError, DataError
from flagsim.rundir import RunDir
from flagsim.schema import DEDUP_FILE_SCHEMA, PARTITION_KEY
from flagsim.search.catalog import ENSEMBLE, complete_models
from flagsim.search.session import RunSearch
from flagsim.shards import read_manifest

log = logging.getLogger(__name__)

DEDUP_FILE = "part-00000.parquet"
# A pair counts when its score >= threshold - TOLERANCE: FAISS sums inner products in float32,
# so identical vectors score 0.99999..1.00001 over thousands of dims (byte-identical images
# under colour-layout: 0.999993) and threshold 1 would miss them.
TOLERANCE = 1e-5


@dataclass(frozen=True)
class DedupResult:
    model: str
    threshold: float
    groups: int
    images: int  # images in a group (of two or more)
    pairs: int  # directed neighbour pairs at or above the threshold (6 for a group of 3)
    seconds: float
    path: str


def calibrated_threshold(model: str) -> float | None:
    """The registry's calibrated near-duplicate cosine of `model` (None: not calibrated)."""
    try:
        from flagsim.models import get_spec

        return get_spec(model).dedup_threshold
    except KeyError:
        return None


def _calibrated(models: Sequence[str]) -> str:
    have = [f"{m} {t:g}" for m in models if (t := calibrated_threshold(m)) is not None]
    return ", ".join(have) or "none of this run's models"


def dedup_models(run: RunDir, models: Sequence[str] | None, threshold: float | None) -> list[str]:
    """Which models to group: the ones named (`all` is the ensemble's table), else every model of
    the run with a calibrated threshold (all of them when `threshold` is given)."""
    present = complete_models(run)
    if models:
        out = list(dict.fromkeys(models))
        for m in out:
            if m != ENSEMBLE and m not in present:
                raise DataError(f"no embeddings for model {m} in {run.root} "
                                f"(models present: {', '.join(present) or 'none'})")
        return out
    if threshold is not None:
        return present
    out = [m for m in present if calibrated_threshold(m) is not None]
    if not out:
        raise ConfigError(
            f"no model of {run.root} has a calibrated dedup threshold ({', '.join(present)}); "
            "pass --threshold (calibrated: pixels 0.9933, colour-layout 0.997)"
        )
    return out


def _threshold(model: str, threshold: float | None, run_models: Sequence[str]) -> float:
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold must be a cosine between -1 and 1, got {threshold}")
        return float(threshold)
    t = calibrated_threshold(model)
    if t is None:
        raise ConfigError(f"model {model} has no calibrated dedup threshold; pass --threshold "
                          f"(calibrated: {_calibrated(run_models)})")
    return t


def _edges(run: RunDir, model: str, threshold: float) -> tuple[list[str], list[str], int]:
    """(a ids, b ids, pairs) of the neighbour table's pairs with score >= threshold - TOLERANCE,
    read part by part (three columns, filtered as read): memory is the pairs kept, not the table.
    Directed: a pair found both ways is two (a group of 3 all in each other's top-k: 6)."""
    a: list[str] = []
    b: list[str] = []
    for loc in run.neighbours_dir(model).list(".parquet"):
        t = loc.read_parquet(columns=["query_id", "neighbour_id", "score"])
        t = t.filter(pc.greater_equal(t.column("score"), pa.scalar(threshold - TOLERANCE, pa.float32())))
        a += t.column("query_id").to_pylist()
        b += t.column("neighbour_id").to_pylist()
    return a, b, len(a)


def _components(a: Sequence[str], b: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(image -> component root index, image -> degree) by union-find over the pairs."""
    index: dict[str, int] = {}
    for x in (*a, *b):
        index.setdefault(x, len(index))
    parent = list(range(len(index)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    degree: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for x, y in zip(a, b, strict=True):
        key = (x, y) if x < y else (y, x)
        if key not in seen:  # a pair appears once per direction in a top-k table
            seen.add(key)
            degree[x] = degree.get(x, 0) + 1
            degree[y] = degree.get(y, 0) + 1
        rx, ry = find(index[x]), find(index[y])
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {x: find(i) for x, i in index.items()}, degree


def group_table(session: RunSearch, model: str, a: Sequence[str], b: Sequence[str]) -> pa.Table:
    """The groups of the pairs (a[i], b[i]) as DEDUP_FILE_SCHEMA rows.

    The representative of a group is its member with the most pairs (ties: the smallest id);
    each row's score is its image's cosine to the representative (1.0 for the representative).
    """
    root_of, degree = _components(a, b)
    members: dict[int, list[str]] = {}
    for x, r in root_of.items():
        members.setdefault(r, []).append(x)
    groups = []
    for ids in members.values():
        rep = min(ids, key=lambda x: (-degree.get(x, 0), x))
        groups.append((rep, sorted(ids)))
    groups.sort(key=lambda g: g[0])
    cols: dict[str, list] = {f.name: [] for f in DEDUP_FILE_SCHEMA}
    cat = session.catalogue
    for g, (rep, ids) in enumerate(groups):
        vec = session.vectors(model, [rep, *ids])
        scores = vec[1:] @ vec[0]
        order = sorted(range(len(ids)), key=lambda i: (ids[i] != rep, -scores[i], ids[i]))
        for i in order:
            cols["group"].append(g)
            cols["size"].append(len(ids))
            cols["image_id"].append(ids[i])
            cols["name"].append(cat.name(ids[i]))
            cols["representative_id"].append(rep)
            cols["score"].append(1.0 if ids[i] == rep else float(np.clip(scores[i], -1, 1)))
    return pa.Table.from_pydict(cols, schema=DEDUP_FILE_SCHEMA)


def write_dedup(
    run_dir: str, models: Sequence[str] | None = None, threshold: float | None = None,
    cfg: Config | None = None,
) -> list[DedupResult]:
    """Write `dedup/model=<m>/part-00000.parquet` (and its manifest, last) for each model.

    Pairs come from the model's neighbour table (written first when missing), so a group is
    a connected component of top-k pairs at or above the threshold: copies more numerous than
    k+1 still join through one another.
    """
    cfg = cfg or Config()
    run = RunDir.at(run_dir)
    names = dedup_models(run, models, threshold)
    present = complete_models(run)
    thresholds = {m: _threshold(m, threshold, present) for m in names}  # all checked first
    session = RunSearch(run, None, cfg)
    from flagsim.search.neighbours import table_problem, write_neighbours

    # the pairs come from the neighbour tables: each one missing or out of date is (re)written
    problems = {m: p for m in names if (p := table_problem(run, m, present))}
    if problems:
        log.info("neighbour tables to write first: %s", "; ".join(
            f"{m} ({p})" for m, p in problems.items()))
        # `all` alone means every model and their ensemble (over fewer it would be another)
        todo = None if ENSEMBLE in problems else list(problems)
        k = _k_of(run, next(iter(problems))) or cfg.neighbours.k
        smallest = min((man.rows for m in present if (man := read_manifest(run, m))), default=k + 1)
        if k > smallest - 1 >= 1:  # a small collection: as many neighbours as it has
            log.warning("neighbours.k=%d clamped to %d (the collection has %d images)", k,
                        smallest - 1, smallest)
            k = smallest - 1
        write_neighbours(run_dir, k, todo, cfg)
    out = []
    for m in names:
        start = time.perf_counter()
        a, b, pairs = _edges(run, m, thresholds[m])
        table = group_table(session, m, a, b)
        target = run.dedup_dir(m)
        run.dedup_manifest(m).delete()  # first: until the new one is written, the table is incomplete
        (target / DEDUP_FILE).write_parquet(table, staging=run.staging)
        groups = len(set(table.column("group").to_pylist()))
        seconds = time.perf_counter() - start
        run.dedup_manifest(m).write_json({
            "model": m, "threshold": thresholds[m], "groups": groups, "images": table.num_rows,
            "pairs": pairs, "neighbours_k": _k_of(run, m), "seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        log.info("%s: %d near-duplicate groups of %d images (cosine >= %.7g) -> %s", m, groups,
                 table.num_rows, thresholds[m], target)
        out.append(DedupResult(m, thresholds[m], groups, table.num_rows, pairs, seconds, str(target)))
    return out


def _k_of(run: RunDir, model: str) -> int | None:
    loc = run.neighbours_manifest(model)
    return loc.read_json().get("k") if loc.exists() else None


def read_dedup(run_dir: str, model: str) -> pa.Table:
    """The group table of `model`, its model as the first column."""
    run = RunDir.at(run_dir)
    if not run.dedup_manifest(model).exists():
        raise DataError(f"no dedup table for model {model} in {run.root} (run `flagsim dedup`)")
    table = (run.dedup_dir(model) / DEDUP_FILE).read_parquet().cast(DEDUP_FILE_SCHEMA)
    return table.add_column(0, pa.field(PARTITION_KEY, pa.string(), nullable=False),
                            pa.array([model] * table.num_rows, pa.string()))
