"""Compare models: each query's top-k per model and for the ensemble, and a model-agreement matrix."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flagsim.config import Config
from flagsim.errors import DataError
from flagsim.search.catalog import ENSEMBLE
from flagsim.search.model_index import Hit, ModelIndex
from flagsim.search.session import RunSearch

log = logging.getLogger(__name__)

__all__ = ["AGREEMENT_SAMPLE", "ORIGINAL_CHECKS", "Comparison", "Hit", "available_queries", "compare",
           "top1_counts"]

#: The original experiment's two checks: the query and the top match it reported.
ORIGINAL_CHECKS: dict[str, str] = {"Chad": "Romania", "Australia": "New Zealand"}
#: The agreement matrix uses at most this many images (a seeded random sample beyond it).
AGREEMENT_SAMPLE = 10_000


@dataclass
class Comparison:
    """Top-k of each query per model and for the ensemble ("all"), plus model agreement."""

    models: list[str]  # models present, in a stable order
    queries: list[str]  # query names as resolved (display names)
    query_ids: dict[str, str]  # query name -> image_id
    results: dict[str, dict[str, list[Hit]]]  # query -> model or "all" -> top-k (self excluded)
    agreement: pd.DataFrame  # models x models, mean top-k overlap in [0, 1], diagonal 1
    k: int

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "models": self.models,
            "queries": self.queries,
            "query_ids": self.query_ids,
            "results": {
                q: {m: [{"rank": h.rank, "image_id": h.image_id, "name": h.name,
                         "score": round(h.score, 6)} for h in hits] for m, hits in per.items()}
                for q, per in self.results.items()
            },
            "agreement": {a: {b: round(float(self.agreement.loc[a, b]), 6) for b in self.models}
                          for a in self.models},
        }


def compare(
    run_dir: str, queries: Sequence[str], k: int = 5, models: Sequence[str] | None = None,
    session: RunSearch | None = None, cfg: Config | None = None, defaults: bool = False,
) -> Comparison:
    """Each query's top-k for every model and the ensemble, and the models' agreement matrix.

    The ensemble ranks the images present in all models by mean cosine over the models.
    Agreement of models A and B is the mean of |top-k_A(x) ∩ top-k_B(x)| / k over the images x
    present in all models (a seeded sample of AGREEMENT_SAMPLE when there are more).
    A `k` larger than the collection allows is clamped to the most neighbours every model has,
    with a warning (compare and the report show what they can). `session`: search through an
    open RunSearch (the report shares one between compare and eval); else one with `cfg`
    (index settings, and the Ray cluster a missing index is built on). `defaults`: the queries
    are the default ones, not the user's: those the run lacks are skipped with one warning, and
    with none present the run's first two images are compared instead.
    """
    if not queries:
        raise DataError("compare needs at least one query name")
    session = session or RunSearch(run_dir, models, cfg)
    names = session.models
    indexes = {m: session.index(m) for m in names}
    cat = session.catalogue
    if defaults:
        present = [q for q in queries if cat.knows(q)]
        if len(present) < len(queries):
            absent = [q for q in queries if q not in present]
            present = present or cat.first(2)
            log.warning("default queries not in this run: %s; comparing %s (name queries to "
                        "choose)", ", ".join(absent), ", ".join(cat.name(i) for i in present))
        queries = present
    resolved: list[str] = []
    query_ids: dict[str, str] = {}
    for text in queries:
        image_id = cat.resolve(text)
        display = cat.name(image_id)
        if display in query_ids and query_ids[display] != image_id:
            display = f"{display} ({image_id})"
        if display not in query_ids:
            resolved.append(display)
            query_ids[display] = image_id
    ensemble = session.index(ENSEMBLE)
    k = clamp_k(k, [*indexes.values(), ensemble])
    # the ensemble's hits in one search: a subset's ensemble streams its shards once a search
    in_ensemble = [query_ids[q] for q in resolved if query_ids[q] in ensemble]
    ensemble_hits = dict(zip(in_ensemble, session.hits(ENSEMBLE, in_ensemble, k), strict=True)) \
        if in_ensemble else {}
    results: dict[str, dict[str, list[Hit]]] = {}
    for q in resolved:
        image_id = query_ids[q]
        per: dict[str, list[Hit]] = {}
        for m in names:
            if image_id in indexes[m]:
                per[m] = session.hits(m, [image_id], k)[0]
            else:
                log.warning("%s is not among model %s's embeddings", q, m)
        if image_id in ensemble_hits:
            per[ENSEMBLE] = ensemble_hits[image_id]
        results[q] = per
    agreement = agreement_matrix(session, [str(i) for i in ensemble.ids], k)
    return Comparison(names, resolved, query_ids, results, agreement, k)


def clamp_k(k: int, indexes: Sequence[ModelIndex]) -> int:
    """`k`, or the most neighbours (self excluded) that every index in `indexes` can give, with
    a warning when that is fewer; k < 1 and collections of one image raise a one-line DataError."""
    smallest = min(indexes, key=lambda idx: idx.count)
    most = smallest.count - 1
    if k < 1 or most < 1:
        smallest.check_k(k)  # the one-line error naming k and the collection
    if k > most:
        log.warning("k=%d clamped to %d (the collection has %d images)", k, most, smallest.count)
        return most
    return k


def agreement_matrix(
    session: RunSearch, common_ids: Sequence[str], k: int, sample: int = AGREEMENT_SAMPLE,
) -> pd.DataFrame:
    """Mean top-k overlap between each pair of models over `common_ids` (sampled if many)."""
    ids = list(common_ids)
    if len(ids) > sample:
        rng = np.random.default_rng(0)
        ids = [ids[i] for i in sorted(rng.choice(len(ids), size=sample, replace=False))]
    names = list(session.models)
    tops: dict[str, np.ndarray] = {}
    for m in names:
        _, pos = session.search(m, ids, k)
        top = session.index(m).ids[np.where(pos >= 0, pos, 0)]
        tops[m] = np.where(pos >= 0, top, None)
    mat = np.eye(len(names))
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            ta, tb = tops[names[a]], tops[names[b]]
            overlap = [
                len({x for x in ra if x is not None} & {x for x in rb if x is not None}) / k
                for ra, rb in zip(ta, tb, strict=True)
            ]
            mat[a, b] = mat[b, a] = float(np.mean(overlap)) if overlap else float("nan")
    return pd.DataFrame(mat, index=pd.Index(names, name="model"), columns=pd.Index(names))


def available_queries(
    run_dir: str, queries: Sequence[str], models: Sequence[str] | None = None
) -> list[str]:
    """The subset of `queries` that name an image of the run (unknown ones left out, logged)."""
    from flagsim.errors import UnknownNameError

    cat = RunSearch(run_dir, models).catalogue
    out = []
    for q in queries:
        try:
            cat.resolve(q)
        except UnknownNameError as exc:
            log.info("left out: %s", exc)
            continue
        out.append(q)
    return out


def top1_counts(comparison: Comparison, query: str) -> Counter:
    """How many models (not counting the ensemble) put each image first for `query`."""
    per = comparison.results.get(query, {})
    return Counter(hits[0].name for m, hits in per.items() if m != ENSEMBLE and hits)
