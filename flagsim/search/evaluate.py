"""hit@1 / hit@5 of each model and the ensemble against a hand-labelled file of similar images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pandas as pd

from flagsim.config import Config
from flagsim.errors import DataError, UnknownNameError
from flagsim.inputfiles import open_csv
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
    """Rows `query,similar` (similar: names separated by ';'); lines starting with '#' are comments.

    UTF-8 (a BOM, as Excel writes, is skipped); anything else is a one-line DataError.
    """
    loc = Location.parse(path or default_pairs_path())
    out = []
    with open_csv(loc, "labelled pairs file", comments="#") as stream:
        if not stream.fieldnames:
            raise DataError(f"{loc} holds no labelled pairs")
        header = [h.strip().lower() for h in stream.fieldnames]
        if header[:2] != ["query", "similar"]:
            raise DataError(f"{loc}: line {stream.line}: expected the header query,similar, "
                            f"got {stream.fieldnames}")
        for row in stream.rows():
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{loc}: line {stream.line}: expected query,similar[;similar...]")
            similar = tuple(s.strip() for s in row[1].split(";") if s.strip())
            out.append(LabelledQuery(row[0].strip(), similar, stream.line))
    if not out:
        raise DataError(f"{loc} holds no labelled pairs")
    return out


@dataclass
class ResolvedPairs:
    """The labelled queries as image ids: `pairs` (query id, similar ids in file order), each
    distinct one once; what was left out, as `FILE: line N...` strings."""

    pairs: list[tuple[str, list[str]]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # names not in the run
    same: list[str] = field(default_factory=list)  # similar names only the query's own image
    repeats: list[str] = field(default_factory=list)  # the same query and similar images again

    def warn(self) -> None:
        """One warning line for each kind of row left out."""
        if self.unknown:  # one summary line, not a line per name (241 on a non-flag run)
            log.warning("%d name(s) of the labelled pairs are not in the run and were left out "
                        "(first: %s)", len(self.unknown), self.unknown[0])
            for line in self.unknown:
                log.debug("%s; left out", line)
        if self.same:
            log.warning("%d labelled pair(s) name the same image as query and as similar and "
                        "were left out (first: %s)", len(self.same), self.same[0])
        if self.repeats:
            log.warning("%d repeated labelled pair(s) dropped, each pair counted once "
                        "(first: %s)", len(self.repeats), self.repeats[0])


def _resolve(cat: Catalogue, name: str, where: str, unknown: list[str]) -> str | None:
    try:
        return cat.resolve(name, suggest=False)
    except UnknownNameError as exc:
        unknown.append(f"{where}: {exc}")
        return None


def resolve_pairs(cat: Catalogue, labelled: Sequence[LabelledQuery], where: str) -> ResolvedPairs:
    """Each labelled query whose image and at least one other similar image are in `cat`, once
    per distinct (query, similar images): names are matched as `Catalogue.resolve` does, so
    `A,B` and `a,b` are the same pair."""
    out = ResolvedPairs()
    seen: dict[tuple[str, frozenset[str]], int] = {}
    for lq in labelled:
        at = f"{where}: line {lq.line}"
        qid = _resolve(cat, lq.query, at, out.unknown)
        found = [s for s in (_resolve(cat, n, at, out.unknown) for n in lq.similar) if s is not None]
        sims = list(dict.fromkeys(s for s in found if s != qid))
        if qid is None:
            continue
        if not sims:
            if found:  # every similar name that is in the run is the query's own image
                out.same.append(at)
            continue
        key = (qid, frozenset(sims))
        if key in seen:
            out.repeats.append(f"{at} repeats line {seen[key]}")
            continue
        seen[key] = lq.line
        out.pairs.append((qid, sims))
    return out


def evaluate(
    run_dir: str, pairs: str | None = None, models: Sequence[str] | None = None,
    session: RunSearch | None = None, cfg: Config | None = None,
) -> pd.DataFrame:
    """One row per model plus "all" (the ensemble): model, pairs, hit@1, hit@5.

    `pairs` counts the labelled queries used for that model (query and at least one similar
    image present; a row repeating an earlier one's query and similar images counts once);
    hit@k is the fraction of them with a labelled similar image among the query's top-k
    neighbours (the query itself excluded).
    """
    session = session or RunSearch(run_dir, models, cfg)
    run = session.run
    where = pairs or default_pairs_path()
    labelled = read_pairs(pairs)
    names = session.models
    found = resolve_pairs(session.catalogue, labelled, where)
    found.warn()
    if not found.pairs:
        if found.same and len(found.same) == len(labelled):
            first = found.same[0].rsplit(": ", 1)[1]
            raise DataError(f"every labelled pair in {where} names the same image as query and "
                            f"as similar (first: {first}); a pair needs two different images")
        also = (f" ({len(found.same)} pair(s) naming the same image twice left out)"
                if found.same else "")
        raise DataError(f"none of the labelled queries in {where} name images in {run.root}{also}")
    resolved = [(q, set(sims)) for q, sims in found.pairs]
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
