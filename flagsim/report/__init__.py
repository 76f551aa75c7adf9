"""A self-contained HTML report (inline images, CSS, data and script) and a PNG contact sheet of a run's neighbours."""

from flagsim.report.build import ReportPaths, build_report, default_png
from flagsim.report.data import (
    ENSEMBLE,
    ReportData,
    image_ids,
    report_data,
    resolve_queries,
    row_models,
    run_catalogue,
    support,
)
from flagsim.report.explore import (
    MAP_MAX,
    Explore,
    MapData,
    SearchTable,
    eval_detail,
    map_data,
    pca_2d,
    run_meta,
    search_table,
)
from flagsim.report.html import CSP, esc, page_csp, render_html, stylesheet
from flagsim.report.sheet import (
    SHEET_AGREE,
    SHEET_BG,
    SHEET_HEADER,
    THUMB_MAX_HEIGHT,
    THUMB_WIDTH,
    SheetLayout,
    Thumbnails,
    make_thumbnail,
    placeholder_tile,
    png_data_uri,
    render_contact_sheet,
)

__all__ = [
    "CSP", "ENSEMBLE", "MAP_MAX", "Explore", "MapData", "SearchTable", "eval_detail", "map_data",
    "page_csp", "pca_2d", "run_meta", "search_table", "SHEET_AGREE", "SHEET_BG", "SHEET_HEADER", "THUMB_MAX_HEIGHT", "THUMB_WIDTH",
    "ReportData", "ReportPaths", "SheetLayout", "Thumbnails", "build_report", "default_png", "esc",
    "image_ids", "make_thumbnail", "placeholder_tile", "png_data_uri", "render_contact_sheet",
    "render_html", "report_data", "resolve_queries", "row_models", "run_catalogue", "stylesheet",
    "support",
]
