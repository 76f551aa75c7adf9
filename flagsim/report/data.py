"""The report's data: which queries, their neighbours per model, the agreement and the evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flagsim.errors import AmbiguousNameError, FlagsimError, UnknownNameError
from flagsim.rundir import RunDir
from flagsim.search.catalog import ENSEMBLE

if TYPE_CHECKING:
    import pandas as pd

    from flagsim.config import Config
    from flagsim.search.catalog import Catalogue
    from flagsim.search.compare import Comparison
    from flagsim.search.session import RunSearch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportData:
    """Everything the page and the contact sheet show, before any rendering."""

    comparison: Comparison
    eval_df: pd.DataFrame | None
    eval_note: str | None  # why there is no evaluation table
    notes: list[str] = field(default_factory=list)  # shown at the top (e.g. skipped queries)
    skipped: list[str] = field(default_factory=list)  # queries not in the run
    session: RunSearch | None = None  # the loaded indexes, for the whole-run parts (explore.py)


def report_data(
    run_dir: str,
    queries: Sequence[str] | None,
    k: int,
    pairs: str | None = None,
    models: Sequence[str] | None = None,
    default_queries: Sequence[str] | None = None,
    cfg: Config | None = None,
) -> ReportData:
    """Resolve the queries, compare the models on them, and evaluate the models (an evaluation
    that cannot run becomes a note, never a failure).

    `queries` None means `default_queries` (default: the config's report.queries); see
    `resolve_queries` for those not in the run.
    """
    from flagsim.config import ReportConfig
    from flagsim.search.compare import compare
    from flagsim.search.evaluate import evaluate
    from flagsim.search.session import RunSearch

    run = RunDir.at(run_dir)
    explicit = queries is not None
    if queries is not None:
        wanted = list(queries)
    else:
        wanted = list(default_queries if default_queries is not None else ReportConfig().queries)
    session = RunSearch(run, models, cfg)  # one load of every index, shared by compare and eval
    present, skipped, notes = resolve_queries(wanted, session.catalogue, explicit)
    comparison = compare(run_dir, present, k=k, models=models, session=session)

    eval_df, eval_note = None, None
    try:
        eval_df = evaluate(run_dir, pairs=pairs, models=models, session=session)
    except FlagsimError as exc:
        log.warning("report: evaluation skipped: %s", exc)
        eval_note = f"Evaluation unavailable: {exc}"
    return ReportData(comparison, eval_df, eval_note, notes, skipped, session)


# --- queries -------------------------------------------------------------------------------------


def run_catalogue(run: RunDir, models: Sequence[str] | None = None) -> Catalogue:
    """Image ids and names of the run's models (read from their indexes' id tables)."""
    from flagsim.search.session import RunSearch

    return RunSearch(run, models).catalogue


def resolve_queries(
    wanted: Sequence[str], catalogue: Catalogue, explicit: bool
) -> tuple[list[str], list[str], list[str]]:
    """Split `wanted` into those the run holds and those it does not; returns (present, skipped, notes).

    Names match as in `flagsim query` (display name or image id, case-insensitive). When none is
    present and the queries were not given explicitly (config defaults), the run's first three
    images are shown instead; explicit queries none of which is present raise UnknownNameError.
    """
    present, skipped, notes, unknown = [], [], [], []
    first_error: UnknownNameError | None = None
    for q in wanted:
        try:
            catalogue.resolve(q)
        except UnknownNameError as exc:
            first_error = first_error or exc
            skipped.append(q)
            if isinstance(exc, AmbiguousNameError):
                notes.append(f"Skipped query: {exc}.")  # ambiguous: several images have this name
            else:
                unknown.append(q)
            continue
        present.append(q)
    if unknown:
        notes.insert(0, f"Skipped queries not in this run: {', '.join(unknown)}.")
    if not present:
        if explicit and first_error is None:
            raise UnknownNameError("no query names given (an empty list)")
        if explicit or not len(catalogue):
            raise UnknownNameError(f"none of the queries is in the run: {first_error}")
        present = catalogue.first(3)
        shown = ", ".join(catalogue.name(i) for i in present)
        notes.append(f"None of the configured queries is in this run; showing {shown}.")
    return present, skipped, notes


# --- what the grid shows -------------------------------------------------------------------------


def image_ids(comparison: Comparison) -> list[str]:
    """Every image id the report shows: each query and each hit, in first-seen order."""
    seen: dict[str, None] = {}
    for q in comparison.queries:
        qid = comparison.query_ids.get(q)
        if qid is not None:
            seen.setdefault(qid)
        for hits in comparison.results.get(q, {}).values():
            for h in hits:
                seen.setdefault(h.image_id)
    return list(seen)


def row_models(comparison: Comparison) -> list[str]:
    """The grid's rows: each model, then the ensemble when present."""
    rows = list(comparison.models)
    if any(ENSEMBLE in comparison.results.get(q, {}) for q in comparison.queries) and ENSEMBLE not in rows:
        rows.append(ENSEMBLE)
    return rows


def support(comparison: Comparison, query: str) -> dict[str, int]:
    """For one query: image id -> how many individual models list it in their top-k."""
    counts: dict[str, int] = {}
    per_model = comparison.results.get(query, {})
    for m in comparison.models:
        for iid in {h.image_id for h in per_model.get(m, [])}:
            counts[iid] = counts.get(iid, 0) + 1
    return counts

