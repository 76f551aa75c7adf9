"""`build_report`: the report's data, rendered as the HTML page and the PNG contact sheet, written."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from flagsim.report.data import image_ids, report_data
from flagsim.report.html import render_html
from flagsim.report.sheet import Thumbnails, render_contact_sheet
from flagsim.rundir import RunDir
from flagsim.storage import Location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportPaths:
    """What `build_report` wrote and which queries it showed or skipped."""

    html: str
    png: str
    queries: list[str]
    skipped: list[str]


def default_png(out: str | Location) -> Location:
    """`<dir>/report.html` -> `<dir>/report.png`: the contact sheet lies next to the page."""
    loc = out if isinstance(out, Location) else Location.parse(out)
    stem = loc.name.rsplit(".", 1)[0] if "." in loc.name else loc.name
    return loc.parent / f"{stem}.png"




def build_report(
    run_dir: str,
    queries: Sequence[str] | None = None,
    k: int = 5,
    pairs: str | None = None,
    out: str | None = None,
    png: str | None = None,
    models: Sequence[str] | None = None,
    title: str | None = None,
    default_queries: Sequence[str] | None = None,
) -> ReportPaths:
    """Compare models on `queries`, evaluate them, and write the HTML page and PNG contact sheet.

    `queries` None means `default_queries` (default: the config's report.queries); defaults not
    in the run are skipped with a note, and if none is there the run's first images are shown.
    Explicit queries that are all absent raise UnknownNameError. The HTML goes to `out`
    (default RUN/report.html) and the sheet to `png` (default: next to it, `.png`).
    """
    run = RunDir.at(run_dir)
    data = report_data(run_dir, queries, k, pairs=pairs, models=models, default_queries=default_queries)
    comparison = data.comparison

    thumbs = Thumbnails.for_run(run)
    ids = image_ids(comparison)
    uris = {i: thumbs.data_uri(i) for i in ids}
    images = {i: thumbs.image(i) for i in ids}
    title = title or f"flagsim report · {run.root.name}"
    page = render_html(comparison, data.eval_df, uris, title, notes=data.notes, eval_note=data.eval_note)

    html_loc = Location.parse(out) if out else run.report
    png_loc = Location.parse(png) if png else default_png(html_loc)
    html_loc.write_text(page)
    sheet = render_contact_sheet(comparison, images, title=title)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    png_loc.write_bytes(buf.getvalue())
    log.info("wrote %s and %s (%d queries, %d images)", html_loc, png_loc, len(comparison.queries), len(ids))
    return ReportPaths(str(html_loc), str(png_loc), list(comparison.queries), data.skipped)
