"""A self-contained HTML report (inline images and CSS) and a PNG contact sheet of a run's neighbours."""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from flagsim.console import plain
from flagsim.errors import FlagsimError, UnknownNameError
from flagsim.rundir import RunDir
from flagsim.storage import Location

if TYPE_CHECKING:
    import pandas as pd

    from flagsim.compare import Comparison
    from flagsim.query import Catalogue

log = logging.getLogger(__name__)

ENSEMBLE = "all"
THUMB_WIDTH = 120
THUMB_MAX_HEIGHT = 90

#: Content-Security-Policy of the page: no scripts, no network, images only from data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def esc(value: Any) -> str:
    """HTML-escape any value for element text or a double-quoted attribute. Control characters
    (NUL, ESC, DEL, C1, bidi overrides) are written as visible escapes such as `\\x00`: HTML
    forbids them and a browser may act on them."""
    return html.escape(plain(value), quote=True)


# --- thumbnails ----------------------------------------------------------------------------------


def placeholder_tile(label: str, width: int = THUMB_WIDTH, height: int = 80) -> Image.Image:
    """A grey tile with a short label, shown where an image is unavailable."""
    im = Image.new("RGB", (width, height), (229, 231, 235))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, width - 1, height - 1), outline=(156, 163, 175))
    font = _font(12)
    lines = _wrap(draw, label, font, width - 10)[:3]
    line_h = 15
    y = (height - line_h * len(lines)) // 2
    for line in lines:
        w = draw.textlength(line, font=font)
        draw.text(((width - w) / 2, y), line, fill=(75, 85, 99), font=font)
        y += line_h
    return im


def make_thumbnail(data: bytes, width: int = THUMB_WIDTH, max_height: int = THUMB_MAX_HEIGHT) -> Image.Image:
    """Decode image bytes (flagsim.decode rules) and scale to `width` px wide (height capped)."""
    from flagsim.decode import decode_image

    arr = decode_image(data)
    im = Image.fromarray(arr, "RGB")
    scale = min(width / im.width, max_height / im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS)


def png_data_uri(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Thumbnails:
    """Thumbnails of a run's images by image id; each image is read, decoded and encoded once.

    `paths` maps image_id -> file path or URI (the run's images table). Without it, or when a
    file is missing or undecodable, a labelled placeholder tile stands in.
    """

    def __init__(self, paths: Mapping[str, str] | None, width: int = THUMB_WIDTH) -> None:
        self._paths = paths
        self.width = width
        self._images: dict[str, Image.Image] = {}
        self._uris: dict[str, str] = {}
        self._placeholders: dict[str, Image.Image] = {}
        self._placeholder_uris: dict[str, str] = {}
        self._placeholder_of: dict[str, str] = {}
        self.decoded = 0
        self.encoded = 0

    @classmethod
    def for_run(cls, run: RunDir, width: int = THUMB_WIDTH) -> Thumbnails:
        """Thumbnails from the run's images table (placeholders only when the run has none)."""
        from flagsim.images import read_images_table

        if not run.images_table.exists():
            log.info("%s has no images table; the report shows placeholders", run.root)
            return cls(None, width)
        table = read_images_table(run.images_table)
        paths = dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(), strict=True))
        return cls(paths, width)

    def _placeholder(self, reason: str) -> Image.Image:
        if reason not in self._placeholders:
            self._placeholders[reason] = placeholder_tile(reason, self.width, round(self.width * 2 / 3))
        return self._placeholders[reason]

    def image(self, image_id: str) -> Image.Image:
        """The thumbnail of `image_id` (or a placeholder tile naming why there is none)."""
        if image_id in self._images:
            return self._images[image_id]
        if image_id in self._placeholder_of:
            return self._placeholder(self._placeholder_of[image_id])
        reason = None
        if self._paths is None:
            reason = "no images table"
        elif image_id not in self._paths:
            reason = "not in images table"
        else:
            loc = Location.parse(self._paths[image_id])
            try:
                data = loc.read_bytes()
            except (OSError, FlagsimError) as exc:
                log.warning("report: cannot read %s (%s): %s", image_id, loc, exc)
                reason = "image file missing"
            else:
                try:
                    self.decoded += 1
                    self._images[image_id] = make_thumbnail(data, self.width)
                    return self._images[image_id]
                except FlagsimError as exc:
                    log.warning("report: cannot decode %s (%s): %s", image_id, loc, exc)
                    reason = "cannot decode image"
        self._placeholder_of[image_id] = reason
        return self._placeholder(reason)

    def data_uri(self, image_id: str) -> str:
        """The thumbnail as a `data:image/png;base64,...` URI (encoded once per image)."""
        if image_id in self._uris:
            return self._uris[image_id]
        im = self.image(image_id)
        reason = self._placeholder_of.get(image_id)
        if reason is not None:
            if reason not in self._placeholder_uris:
                self._placeholder_uris[reason] = png_data_uri(im)
            return self._placeholder_uris[reason]
        self.encoded += 1
        self._uris[image_id] = png_data_uri(im)
        return self._uris[image_id]


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


# --- agreement helpers ---------------------------------------------------------------------------


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


# --- HTML ----------------------------------------------------------------------------------------

_CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --accent:#1f2a44; --agree:#f59e0b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans",
  Arial, sans-serif; color: var(--ink); background: #f8fafc; }
header.top { background: var(--accent); color: #fff; padding: 18px 28px; }
header.top h1 { margin: 0 0 4px; font-size: 22px; }
header.top .meta { margin: 0; color: #cbd5e1; font-size: 13px; overflow-wrap: anywhere; }
main { padding: 8px 28px 40px; max-width: 1500px; }
nav.toc { margin: 14px 0 4px; display: flex; flex-wrap: wrap; gap: 6px; }
nav.toc a { padding: 3px 10px; border-radius: 12px; background: #e2e8f0; color: var(--ink);
  text-decoration: none; font-size: 13px; }
.note { background: #fff7ed; border: 1px solid #fed7aa; color: #9a3412; padding: 8px 12px;
  border-radius: 6px; margin: 12px 0; }
section.card { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 14px 18px 16px; margin: 18px 0; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
section.card h2 { margin: 0 0 10px; font-size: 18px; }
.legend { color: var(--muted); font-size: 12px; margin: 0 0 10px; }
.qbody { display: flex; gap: 20px; align-items: flex-start; }
figure { margin: 0; }
figure.queryflag { flex: 0 0 auto; text-align: center; padding: 10px; border-radius: 8px;
  background: #eef2ff; border: 1px solid #c7d2fe; }
figure.queryflag img { width: 180px; height: auto; display: block; border: 1px solid #d1d5db; }
figure.queryflag figcaption { margin-top: 6px; font-weight: 600; max-width: 180px;
  overflow-wrap: anywhere; }
table.hits { border-collapse: separate; border-spacing: 6px 4px; }
table.hits th.model { text-align: right; padding-right: 8px; font-size: 13px; color: var(--ink);
  white-space: nowrap; vertical-align: middle; }
table.hits tr.ensemble th.model { color: #7c2d12; }
table.hits tr.ensemble td figure { background: #fffbeb; }
table.hits td { vertical-align: top; padding: 0; }
figure.hit { width: 132px; padding: 5px; border-radius: 6px; border: 2px solid transparent;
  background: #f9fafb; position: relative; }
figure.hit .frame { width: 120px; height: 84px; display: flex; align-items: center;
  justify-content: center; }
figure.hit img { max-width: 120px; max-height: 84px; display: block; border: 1px solid #d1d5db; }
figure.hit figcaption { font-size: 12px; margin-top: 3px; line-height: 1.25; }
figure.hit .name { display: block; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
figure.hit .score { color: var(--muted); font-variant-numeric: tabular-nums; }
figure.hit .support { float: right; font-size: 11px; color: #92400e; }
figure.hit.agree-some { border-color: #fcd34d; }
figure.hit.agree-all { border-color: var(--agree); background: #fffbeb; }
.placeholder { width: 120px; height: 80px; display: flex; align-items: center; justify-content: center;
  background: #e5e7eb; color: #4b5563; font-size: 12px; border: 1px solid #9ca3af; }
table.matrix, table.eval { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.matrix th, table.matrix td { padding: 8px 10px; text-align: center; font-size: 13px; }
table.matrix th { color: var(--ink); font-weight: 600; }
table.matrix td { min-width: 64px; border: 1px solid #fff; }
table.eval th, table.eval td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left; }
table.eval td.num { text-align: right; }
.bar { display: inline-block; height: 9px; background: #60a5fa; border-radius: 2px;
  vertical-align: middle; margin-left: 8px; }
td.best { font-weight: 700; }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 30px; }
"""


def _heat(v: float) -> tuple[str, str]:
    """Background and text colour for a value in [0, 1] (pale yellow -> orange -> dark red)."""
    stops = [(0.0, (255, 247, 236)), (0.35, (253, 212, 158)), (0.65, (252, 141, 89)),
             (0.85, (215, 48, 31)), (1.0, (127, 0, 0))]
    if not math.isfinite(v):
        return "#f3f4f6", "#111827"
    v = min(1.0, max(0.0, v))
    for (a, ca), (b, cb) in zip(stops, stops[1:], strict=False):
        if v <= b:
            t = (v - a) / (b - a)
            rgb = tuple(round(x + (y - x) * t) for x, y in zip(ca, cb, strict=True))
            break
    text = "#ffffff" if v > 0.72 else "#111827"
    return "#{:02x}{:02x}{:02x}".format(*rgb), text


def _img(uri: str | None, alt: str, width: int | None = None) -> str:
    if uri is None or not uri.startswith("data:image/"):
        return f'<div class="placeholder" role="img" aria-label="{esc(alt)}">no image</div>'
    w = f' width="{width}"' if width else ""
    return f'<img src="{esc(uri)}" alt="{esc(alt)}"{w}>'


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def _query_section(comparison: Comparison, i: int, query: str, thumbs: Mapping[str, str]) -> str:
    qid = comparison.query_ids.get(query, "")
    per_model = comparison.results.get(query, {})
    counts = support(comparison, query)
    n_models = len(comparison.models)
    out = [
        f'<section class="card query" id="q{i}" data-query="{esc(query)}">',
        f"<h2>{esc(query)}</h2>",
        '<div class="qbody">',
        f'<figure class="queryflag">{_img(thumbs.get(qid), query)}'
        f"<figcaption>{esc(query)}</figcaption></figure>",
        '<table class="hits"><tbody>',
    ]
    for model in row_models(comparison):
        hits = per_model.get(model)
        cls = ' class="ensemble"' if model == ENSEMBLE else ""
        label = "all (ensemble)" if model == ENSEMBLE else model
        out.append(f'<tr data-model="{esc(model)}"{cls}><th class="model" scope="row">{esc(label)}</th>')
        if not hits:
            out.append('<td><span class="legend">no neighbours</span></td>')
        for h in hits or []:
            c = counts.get(h.image_id, 0)
            agree = ""
            if n_models > 1 and c == n_models:
                agree = " agree-all"
            elif n_models > 2 and c > 1:
                agree = " agree-some"
            badge = (f'<span class="support" title="listed by {c} of {n_models} models">{c}/{n_models}</span>'
                     if n_models > 1 and c > 1 else "")
            out.append(
                f'<td><figure class="hit{agree}" data-image-id="{esc(h.image_id)}">'
                f'<div class="frame">{_img(thumbs.get(h.image_id), h.name)}</div>'
                f'<figcaption><span class="name" title="{esc(h.name)}">{h.rank}. {esc(h.name)}</span>'
                f'<span class="score">{_fmt(float(h.score))}</span>{badge}</figcaption></figure></td>'
            )
        out.append("</tr>")
    out.append("</tbody></table></div></section>")
    return "\n".join(out)


def _matrix_section(agreement: pd.DataFrame | None, k: int) -> str:
    out = ['<section class="card" id="agreement" data-section="agreement">',
           "<h2>Model agreement</h2>"]
    if agreement is None or agreement.empty:
        out.append('<p class="legend">No agreement matrix (fewer than two models).</p></section>')
        return "\n".join(out)
    out.append(
        f'<p class="legend">Share of top-{k} neighbours two models have in common, averaged over '
        "the images: 0 = never the same neighbours, 1 = always the same.</p>"
    )
    cols = [str(c) for c in agreement.columns]
    out.append('<table class="matrix" data-matrix="agreement"><thead><tr><th></th>')
    out.extend(f'<th scope="col">{esc(c)}</th>' for c in cols)
    out.append("</tr></thead><tbody>")
    for idx, row in agreement.iterrows():
        out.append(f'<tr data-model="{esc(idx)}"><th scope="row">{esc(idx)}</th>')
        for v in row.tolist():
            fv = float(v)
            bg, fg = _heat(fv)
            out.append(f'<td style="background:{bg};color:{fg}">{_fmt(fv, 2)}</td>')
        out.append("</tr>")
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _eval_section(eval_df: pd.DataFrame | None, note: str | None) -> str:
    out = ['<section class="card" id="evaluation" data-section="evaluation">', "<h2>Evaluation</h2>"]
    if eval_df is None or eval_df.empty:
        out.append(f'<p class="legend">{esc(note or "No evaluation available.")}</p></section>')
        return "\n".join(out)
    out.append(
        '<p class="legend">Share of the labelled queries (pairs: how many this model could use) '
        "with a labelled similar image as the top neighbour (hit@1) or among the top 5 (hit@5); "
        "best per column in bold.</p>"
    )
    cols = [str(c) for c in eval_df.columns]
    rate_cols = [c for c in cols if c.startswith("hit@")]
    best = {c: eval_df[c].max() for c in rate_cols}
    out.append('<table class="eval" data-table="evaluation"><thead><tr>')
    out.extend(f'<th scope="col">{esc(c)}</th>' for c in cols)
    out.append("</tr></thead><tbody>")
    for rec in eval_df.to_dict("records"):
        model = rec.get("model", "")
        out.append(f'<tr data-model="{esc(model)}">')
        for c in cols:
            v = rec[c]
            if c in rate_cols:
                fv = float(v)
                cls = "num best" if fv == best[c] and math.isfinite(fv) else "num"
                width = round(max(0.0, min(1.0, fv)) * 100) if math.isfinite(fv) else 0
                out.append(f'<td class="{cls}">{_fmt(fv, 2)}<span class="bar" style="width:{width}px">'
                           "</span></td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(f'<td class="num">{esc(_fmt(v))}</td>')
            else:
                out.append(f"<td>{esc(v)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></section>")
    return "\n".join(out)


def render_html(
    comparison: Comparison,
    eval_df: pd.DataFrame | None,
    thumbs: Mapping[str, str],
    title: str,
    notes: Sequence[str] = (),
    subtitle: str = "",
    eval_note: str | None = None,
) -> str:
    """The report page. `thumbs` maps image id -> `data:` URI; every name is HTML-escaped.

    Ids without a thumbnail get a "no image" tile; `notes` (e.g. skipped queries) are shown
    at the top, and `eval_note` in place of the evaluation table when `eval_df` is None.
    """
    models = list(comparison.models)
    meta = subtitle or f"models: {', '.join(models)} · top-{comparison.k} neighbours by cosine similarity"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<header class="top"><h1>{esc(title)}</h1><p class="meta">{esc(meta)}</p></header>',
        "<main>",
    ]
    for n in notes:
        parts.append(f'<p class="note">{esc(n)}</p>')
    toc = [f'<a href="#q{i}">{esc(q)}</a>' for i, q in enumerate(comparison.queries)]
    toc += ['<a href="#agreement">agreement</a>', '<a href="#evaluation">evaluation</a>']
    parts.append(f'<nav class="toc">{"".join(toc)}</nav>')
    if comparison.queries:
        parts.append(
            '<p class="legend">Each row lists one model\'s nearest images with their cosine '
            "similarity; the last row is the ensemble of all models. A gold frame marks an image "
            "every model lists; n/m counts the models listing it.</p>"
        )
    for i, q in enumerate(comparison.queries):
        parts.append(_query_section(comparison, i, q, thumbs))
    parts.append(_matrix_section(getattr(comparison, "agreement", None), comparison.k))
    parts.append(_eval_section(eval_df, eval_note))
    parts.append("</main><footer>Generated by flagsim report. Self-contained: all images are "
                 "embedded; the page loads nothing from the network and runs no scripts.</footer>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --- contact sheet -------------------------------------------------------------------------------

SHEET_BG = (255, 255, 255)
SHEET_HEADER = (31, 42, 68)  # the band that starts each query's block
SHEET_AGREE = (245, 158, 11)
_FONT_CACHE: dict[tuple[int, bool], Any] = {}


def _font(size: int, bold: bool = False) -> Any:
    key = (size, bold)
    if key not in _FONT_CACHE:
        names = ("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf") if bold else (
            "DejaVuSans.ttf", "LiberationSans-Regular.ttf")
        font = None
        for name in names:
            try:
                font = ImageFont.truetype(name, size)
                break
            except OSError:
                continue
        _FONT_CACHE[key] = font or ImageFont.load_default(size=size)
    return _FONT_CACHE[key]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    return [_fit(draw, line, font, width) for line in lines] or [""]


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of the contact sheet."""

    margin: int = 16
    title_h: int = 40
    header_h: int = 30
    label_w: int = 130
    cell_w: int = 132
    tile_w: int = THUMB_WIDTH
    tile_h: int = THUMB_MAX_HEIGHT
    text_h: int = 36
    row_gap: int = 8
    block_gap: int = 18

    @property
    def row_h(self) -> int:
        return self.tile_h + self.text_h + self.row_gap

    def block_h(self, n_rows: int) -> int:
        return self.header_h + 8 + n_rows * self.row_h


def _paste_tile(sheet: Image.Image, tile: Image.Image, x: int, y: int, lay: SheetLayout) -> None:
    t = tile
    if t.width > lay.tile_w or t.height > lay.tile_h:
        t = t.copy()
        t.thumbnail((lay.tile_w, lay.tile_h))
    ox = x + (lay.tile_w - t.width) // 2
    oy = y + (lay.tile_h - t.height) // 2
    sheet.paste(t.convert("RGB"), (ox, oy))
    ImageDraw.Draw(sheet).rectangle((ox - 1, oy - 1, ox + t.width, oy + t.height), outline=(209, 213, 219))


def render_contact_sheet(
    comparison: Comparison,
    thumbs_images: Mapping[str, Image.Image],
    title: str | None = None,
    layout: SheetLayout | None = None,
) -> Image.Image:
    """A PNG-ready image of the report's grid: one block per query, one row per model.

    Each row holds the model's name, the query's thumbnail and its k neighbours with name and
    score; a gold frame marks a neighbour every model lists. Missing thumbnails get a placeholder.
    """
    lay = layout or SheetLayout()
    rows = row_models(comparison)
    k = max([comparison.k] + [len(h) for q in comparison.queries
                              for h in comparison.results.get(q, {}).values()])
    width = lay.margin * 2 + lay.label_w + (k + 1) * lay.cell_w + 16
    height = lay.margin * 2 + lay.title_h + sum(
        lay.block_h(len(rows)) + lay.block_gap for _ in comparison.queries
    )
    if not comparison.queries:
        height += 40
    sheet = Image.new("RGB", (width, height), SHEET_BG)
    draw = ImageDraw.Draw(sheet)
    f_title, f_head, f_label = _font(20, True), _font(15, True), _font(13, True)
    f_text, f_small = _font(12), _font(11)
    placeholder = placeholder_tile("no image", lay.tile_w, round(lay.tile_w * 2 / 3))
    draw.text((lay.margin, lay.margin + 6), _fit(draw, title or "flagsim report", f_title, width - 40),
              fill=(17, 24, 39), font=f_title)
    if not comparison.queries:
        draw.text((lay.margin, lay.margin + lay.title_h), "no queries", fill=(107, 114, 128), font=f_text)
    n_models = len(comparison.models)
    y = lay.margin + lay.title_h
    x0 = lay.margin + lay.label_w
    for q in comparison.queries:
        per_model = comparison.results.get(q, {})
        counts = support(comparison, q)
        draw.rectangle((lay.margin, y, width - lay.margin, y + lay.header_h), fill=SHEET_HEADER)
        draw.text((lay.margin + 10, y + 7), _fit(draw, plain(f"query: {q}"), f_head, width - 60),
                  fill=(255, 255, 255), font=f_head)
        y += lay.header_h + 8
        qtile = thumbs_images.get(comparison.query_ids.get(q, ""), placeholder)
        for model in rows:
            label = "all (ensemble)" if model == ENSEMBLE else model
            draw.text((lay.margin + 4, y + lay.tile_h // 2 - 8), _fit(draw, label, f_label, lay.label_w - 12),
                      fill=(124, 45, 18) if model == ENSEMBLE else (31, 41, 55), font=f_label)
            _paste_tile(sheet, qtile, x0, y, lay)
            draw.text((x0, y + lay.tile_h + 3), _fit(draw, plain(q), f_text, lay.tile_w), fill=(55, 65, 81),
                      font=f_text)
            draw.text((x0, y + lay.tile_h + 18), "query", fill=(107, 114, 128), font=f_small)
            sep_x = x0 + lay.cell_w - 6
            draw.line((sep_x, y, sep_x, y + lay.tile_h + lay.text_h - 4), fill=(203, 213, 225), width=2)
            for j, h in enumerate(per_model.get(model, [])):
                x = x0 + (j + 1) * lay.cell_w
                c = counts.get(h.image_id, 0)
                if n_models > 1 and c == n_models:
                    draw.rectangle((x - 4, y - 3, x + lay.tile_w + 3, y + lay.tile_h + lay.text_h - 2),
                                   outline=SHEET_AGREE, width=2)
                _paste_tile(sheet, thumbs_images.get(h.image_id, placeholder), x, y, lay)
                draw.text((x, y + lay.tile_h + 3), _fit(draw, plain(f"{h.rank}. {h.name}"), f_text, lay.tile_w),
                          fill=(17, 24, 39), font=f_text)
                score = f"{float(h.score):.3f}" + (f"  {c}/{n_models}" if n_models > 1 and c > 1 else "")
                draw.text((x, y + lay.tile_h + 18), score, fill=(107, 114, 128), font=f_small)
            y += lay.row_h
        y += lay.block_gap
    return sheet


# --- build ---------------------------------------------------------------------------------------


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


def run_catalogue(run: RunDir, models: Sequence[str] | None = None) -> Catalogue:
    """Image ids and names of the run's embeddings (only those two columns of each shard are read)."""
    from flagsim.index import resolve_models
    from flagsim.query import Catalogue
    from flagsim.shards import done_shards

    names: dict[str, str] = {}
    for model in resolve_models(run, models):
        for _, loc in sorted(done_shards(run, model).items()):
            table = loc.read_parquet(columns=["image_id", "name"])
            for i, n in zip(table.column("image_id").to_pylist(), table.column("name").to_pylist(),
                            strict=True):
                names.setdefault(i, n)
    return Catalogue(names)


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
            key = q.strip().casefold()
            if sum(n.casefold() == key for n in catalogue.names.values()) > 1:
                notes.append(f"Skipped query: {exc}.")  # ambiguous: several images have this name
            else:
                unknown.append(q)
            continue
        present.append(q)
    if unknown:
        notes.insert(0, f"Skipped queries not in this run: {', '.join(unknown)}.")
    if not present:
        if explicit or not catalogue.names:
            raise UnknownNameError(f"none of the queries is in the run: {first_error}")
        present = list(catalogue.names)[:3]
        shown = ", ".join(catalogue.name(i) for i in present)
        notes.append(f"None of the configured queries is in this run; showing {shown}.")
    return present, skipped, notes


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
    from flagsim.compare import compare
    from flagsim.config import ReportConfig
    from flagsim.evaluate import evaluate

    run = RunDir.at(run_dir)
    explicit = queries is not None
    if queries is not None:
        wanted = list(queries)
    else:
        wanted = list(default_queries if default_queries is not None else ReportConfig().queries)
    present, skipped, notes = resolve_queries(wanted, run_catalogue(run, models), explicit)
    comparison = compare(run_dir, present, k=k, models=models)

    eval_df, eval_note = None, None
    try:
        eval_df = evaluate(run_dir, pairs=pairs, models=models)
    except FlagsimError as exc:
        log.warning("report: evaluation skipped: %s", exc)
        eval_note = f"Evaluation unavailable: {exc}"

    thumbs = Thumbnails.for_run(run)
    ids = image_ids(comparison)
    uris = {i: thumbs.data_uri(i) for i in ids}
    images = {i: thumbs.image(i) for i in ids}
    title = title or f"flagsim report · {run.root.name}"
    page = render_html(comparison, eval_df, uris, title, notes=notes, eval_note=eval_note)

    html_loc = Location.parse(out) if out else run.report
    png_loc = Location.parse(png) if png else default_png(html_loc)
    html_loc.write_text(page)
    sheet = render_contact_sheet(comparison, images, title=title)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    png_loc.write_bytes(buf.getvalue())
    log.info("wrote %s and %s (%d queries, %d images)", html_loc, png_loc, len(comparison.queries), len(ids))
    return ReportPaths(str(html_loc), str(png_loc), list(comparison.queries), skipped)
