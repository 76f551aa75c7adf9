"""hit@1 / hit@5 of each model and the ensemble against a hand-labelled file of similar images."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd

from flagsim.config import Config
from flagsim.errors import DataError, UnknownNameError
from flagsim.search.catalog import ENSEMBLE, Catalogue
from flagsim.search.model_index import ModelIndex
from flagsim.search.session import RunSearch
from flagsim.storage import Location

log = logging.getLogger(__name__)

PAIRS_FILE = "similar_flags.csv"
HIT_KS = (1, 5)


def default_pairs_path() -> str:
    """The bundled labelled file (flagsim/configs/similar_flags.csv, a copy of configs/)."""
    return str(resources.files("flagsim") / "configs" / PAIRS_FILE)


@dataclass(frozen=True)
class LabelledQuery:
    query: str
    similar: tuple[str, ...]
    line: int


def read_pairs(path: str | None = None) -> list[LabelledQuery]:
    """Rows `query,similar` (similar: names separated by ';'); lines starting with '#' are comments."""
    loc = Location.parse(path or default_pairs_path())
    if not loc.is_file():
        raise DataError(f"labelled pairs file not found: {loc}")
    lines = loc.read_text().splitlines()
    body = [(n, line) for n, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not body:
        raise DataError(f"{loc} holds no labelled pairs")
    reader = csv.reader(io.StringIO("\n".join(line for _, line in body)))
    rows = list(reader)
    header = [h.strip().lower() for h in rows[0]]
    if header[:2] != ["query", "similar"]:
        raise DataError(f"{loc}: line {body[0][0]}: expected the header query,similar, got {rows[0]}")
    out = []
    for (n, _), row in zip(body[1:], rows[1:], strict=True):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{loc}: line {n}: expected query,similar[;similar...]")
        similar = tuple(s.strip() for s in row[1].split(";") if s.strip())
        out.append(LabelledQuery(row[0].strip(), similar, n))
    return out


def _resolve(cat: Catalogue, name: str, where: str, unknown: list[str]) -> str | None:
    try:
        return cat.resolve(name, suggest=False)
    except UnknownNameError as exc:
        unknown.append(f"{where}: {exc}")
        return None


def evaluate(
    run_dir: str, pairs: str | None = None, models: Sequence[str] | None = None,
    session: RunSearch | None = None, cfg: Config | None = None,
) -> pd.DataFrame:
    """One row per model plus "all" (the ensemble): model, pairs, hit@1, hit@5.

    `pairs` counts the labelled queries used for that model (query and at least one similar
    image present); hit@k is the fraction of them with a labelled similar image among the
    query's top-k neighbours (the query itself excluded).
    """
    session = session or RunSearch(run_dir, models, cfg)
    run = session.run
    where = pairs or default_pairs_path()
    labelled = read_pairs(pairs)
    names = session.models
    cat = session.catalogue
    resolved: list[tuple[str, set[str]]] = []
    unknown: list[str] = []  # one summary line, not a line per name (241 on a non-flag run)
    for lq in labelled:
        at = f"{where}: line {lq.line}"
        qid = _resolve(cat, lq.query, at, unknown)
        sims = {s for s in (_resolve(cat, n, at, unknown) for n in lq.similar) if s is not None}
        sims.discard(qid)
        if qid is not None and sims:
            resolved.append((qid, sims))
    if unknown:
        log.warning("%d name(s) of the labelled pairs are not in the run and were left out "
                    "(first: %s)", len(unknown), unknown[0])
        for line in unknown:
            log.debug("%s; left out", line)
    if not resolved:
        raise DataError(f"none of the labelled queries in {where} name images in {run.root}")
    kmax = max(HIT_KS)
    rows = []
    for m in [*names, ENSEMBLE]:
        rows.append(_score(m, session.index(m), lambda ids, m=m: session.vectors(m, ids),
                           resolved, kmax))
    return pd.DataFrame(rows, columns=["model", "pairs", *(f"hit@{k}" for k in HIT_KS)])


def _score(model: str, index: ModelIndex, vectors, resolved: list[tuple[str, set[str]]],
           kmax: int) -> dict:
    usable = [(q, {s for s in sims if s in index}) for q, sims in resolved if q in index]
    usable = [(q, sims) for q, sims in usable if sims]
    row: dict = {"model": model, "pairs": len(usable)}
    if not usable:
        row.update({f"hit@{k}": float("nan") for k in HIT_KS})
        return row
    kmax = min(kmax, index.count - 1)  # a collection smaller than k+1 shows all it has
    qids = [q for q, _ in usable]
    _, pos = index.search(vectors(qids), kmax, exclude=qids, normalised=True)
    for k in HIT_KS:
        hits = [
            any(str(index.ids[p]) in sims for p in prow[:k] if p >= 0)
            for prow, (_, sims) in zip(pos, usable, strict=True)
        ]
        row[f"hit@{k}"] = float(np.mean(hits))
    return row
