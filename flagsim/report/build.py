"""`build_report`: the report's data, rendered as the HTML page and the PNG contact sheet, written."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from flagsim.config import Config
from flagsim.errors import FlagsimError
from flagsim.inputfiles import read_regular
from flagsim.report.data import image_ids, report_data
from flagsim.report.explore import (
    MAP_MAX,
    Explore,
    dedup_groups,
    eval_detail,
    map_data,
    run_meta,
    search_table,
)
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


#: The contact sheet's image format by the suffix of its file (no suffix: PNG).
SHEET_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: The longest side each format can encode (PNG: no practical limit); a sheet grows ~460-1000
#: px per query, so a long --queries list outgrows WebP (and, far later, JPEG).
SHEET_MAX_SIDE = {"JPEG": 65_500, "WEBP": 16_383}


def sheet_format(path: str | Location) -> str:
    """PIL's format name for a contact sheet written to `path`; ConfigError for another suffix
    (`--png x.jpg` used to write PNG bytes under a .jpg name)."""
    from flagsim.errors import ConfigError

    name = path.name if isinstance(path, Location) else Location.parse(path).name
    suffix = "." + name.rsplit(".", 1)[1].lower() if "." in name.lstrip(".") else ""
    if not suffix:
        return "PNG"
    if suffix not in SHEET_FORMATS:
        raise ConfigError(f"contact sheet {path}: {suffix} is not a format it can be written in; "
                          f"name it {', '.join(sorted(SHEET_FORMATS))}")
    return SHEET_FORMATS[suffix]


def default_png(out: str | Location) -> Location:
    """`<dir>/report.html` -> `<dir>/report.png`: the contact sheet lies next to the page."""
    loc = out if isinstance(out, Location) else Location.parse(out)
    stem = loc.name.rsplit(".", 1)[0] if "." in loc.name else loc.name
    return loc.parent / f"{stem}.png"




#: Thumbnails embedded for the search box: the shown images plus the run's first this many.
THUMBS_MAX = 1000


def _explore(data, pairs: str | None, thumbs: Thumbnails, shown: Sequence[str], map_max: int,
             thumbs_max: int, projection: str) -> Explore:
    """The whole-run parts: search table, maps, evaluation detail, header and distinct thumbnails."""
    session = data.session
    table = search_table(session, data.comparison.k)
    maps = map_data(session, table, map_max=map_max, projection=projection)
    rows = []
    if data.eval_df is not None:
        try:
            rows = eval_detail(session, pairs)
        except FlagsimError as exc:
            log.warning("report: evaluation detail skipped: %s", exc)
    pos = {i: p for p, i in enumerate(table.ids[:thumbs_max])}
    for i in shown:
        if i not in pos:
            p = session.catalogue.ids.index(i).as_py()
            if p is not None and p >= 0:
                pos[i] = p
    distinct: dict[str, int] = {}
    thumb_of = [-1] * len(table.ids)
    for i, p in pos.items():
        uri = thumbs.data_uri(i)
        thumb_of[p] = distinct.setdefault(uri, len(distinct))
    return Explore(table, maps, rows, run_meta(session), thumb_of, list(distinct),
                   dedup=dedup_groups(session))


def _write_pair(html_loc: Location, page: bytes, png_loc: Location, sheet: bytes) -> None:
    """Write the page, then the sheet (each atomically); should the sheet fail, the page is put
    back as it was (or removed if it was new), so that the two never come from two reports."""
    existed = html_loc.exists()
    previous = read_regular(html_loc) if existed else None
    html_loc.write_bytes(page)
    try:
        png_loc.write_bytes(sheet)
    except BaseException:
        try:
            if not existed:
                html_loc.delete()
            elif previous is not None:
                html_loc.write_bytes(previous)
        except OSError as exc:
            log.warning("report: could not put %s back after the sheet failed: %s", html_loc, exc)
        raise


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
    map_max: int = MAP_MAX,
    thumbs_max: int = THUMBS_MAX,
    projection: str = "auto",
    cfg: Config | None = None,
) -> ReportPaths:
    """Compare models on `queries`, evaluate them, and write the HTML page and PNG contact sheet.

    `queries` None means `default_queries` (default: the config's report.queries); defaults not
    in the run are skipped with a note, and if none is there the run's first images are shown.
    Explicit queries that are all absent raise UnknownNameError. The HTML goes to `out`
    (default RUN/report.html) and the sheet to `png` (default: next to it, `.png`).

    The page also carries every image's top-k (search box), a map per model of at most `map_max`
    images (PCA; plus UMAP/t-SNE when installed and `projection` is "auto"; "pca" for PCA only)
    and thumbnails of the shown images and the first `thumbs_max` of the run. `cfg`: the index
    settings and Ray cluster with which a missing index is built (default: RAY_ADDRESS only).
    """
    run = RunDir.at(run_dir)
    data = report_data(run_dir, queries, k, pairs=pairs, models=models,
                       default_queries=default_queries, cfg=cfg)
    comparison = data.comparison

    thumbs = Thumbnails.for_run(run)
    ids = image_ids(comparison)
    uris = {i: thumbs.data_uri(i) for i in ids}
    images = {i: thumbs.image(i) for i in ids}
    title = title or f"flagsim report · {run.root.name}"
    explore = _explore(data, pairs, thumbs, ids, map_max, thumbs_max, projection)
    page = render_html(comparison, data.eval_df, uris, title, notes=data.notes, eval_note=data.eval_note,
                       explore=explore)

    # Both are made before either is written: a sheet that failed to draw once left a new page
    # beside the sheet of an earlier report.
    sheet = render_contact_sheet(comparison, images, title=title)
    html_loc = Location.parse(out) if out else run.report
    png_loc = Location.parse(png) if png else default_png(html_loc)
    fmt = sheet_format(png_loc)
    if max(sheet.size) > SHEET_MAX_SIDE.get(fmt, max(sheet.size)):
        from flagsim.errors import ConfigError

        raise ConfigError(f"contact sheet {png_loc}: {sheet.width}x{sheet.height} px is larger than "
                          f"{fmt} can hold ({SHEET_MAX_SIDE[fmt]} px a side); name it .png, or "
                          f"ask for fewer queries")
    buf = io.BytesIO()
    sheet.save(buf, format=fmt, **({"optimize": True} if fmt != "WEBP" else {"quality": 90}))
    _write_pair(html_loc, page.encode("utf-8"), png_loc, buf.getvalue())
    log.info("wrote %s and %s (%d queries, %d images)", html_loc, png_loc, len(comparison.queries), len(ids))
    return ReportPaths(str(html_loc), str(png_loc), list(comparison.queries), data.skipped)
