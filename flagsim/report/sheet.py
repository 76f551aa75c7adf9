"""The report's PIL side: thumbnails (each image decoded once) and the PNG contact sheet."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from flagsim.console import plain
from flagsim.errors import FlagsimError
from flagsim.refs import ImageRef, read_ref
from flagsim.report.data import row_models, support
from flagsim.rundir import RunDir
from flagsim.search.catalog import ENSEMBLE
from flagsim.storage import Location

if TYPE_CHECKING:
    from flagsim.search.compare import Comparison

log = logging.getLogger(__name__)

THUMB_WIDTH = 120
THUMB_MAX_HEIGHT = 90


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

    `paths` maps image_id -> file path or URI, or an `ImageRef` (a tar member, a Parquet cell;
    the run's images table). Without it, or when a file is missing or undecodable, a labelled
    placeholder tile stands in.
    """

    def __init__(self, paths: Mapping[str, Any] | None, width: int = THUMB_WIDTH) -> None:
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
        paths: dict[str, Any] = {}
        for row in table.select(["image_id", "path", "container", "member", "offset", "size"]).to_pylist():
            ref = ImageRef.from_row(row)
            paths[row["image_id"]] = ref if ref.container else ref.path
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
            where = self._paths[image_id]
            loc = where.describe() if not isinstance(where, str) else Location.parse(where)
            try:
                data = read_ref(where) if not isinstance(where, str) else loc.read_bytes()
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


def _length(draw: ImageDraw.ImageDraw, text: str, font: Any) -> float | None:
    """The width of `text` in pixels, or None where the text layout refuses it (raqm failed on
    a paragraph separator, FreeType on a newline)."""
    try:
        return draw.textlength(text, font=font)
    except (RuntimeError, ValueError, OSError):
        return None


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    words, lines, cur = plain(text).split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        n = _length(draw, trial, font)
        if (n is not None and n <= width) or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    return [_fit(draw, line, font, width) for line in lines] or [""]


def _fit(draw: ImageDraw.ImageDraw, text: Any, font: Any, width: int) -> str:
    """`text` made safe to draw and cut with an ellipsis to fit `width` pixels.

    Controls and line/paragraph separators are shown as escapes (`plain`); should the layout
    still refuse the text, every non-ASCII character is escaped too. The cut is found by
    bisection: a 5,000-character name costs a dozen measurements, not thousands."""
    text = plain(text)
    n = _length(draw, text, font)
    if n is None:
        text = text.encode("ascii", "backslashreplace").decode("ascii")
        n = _length(draw, text, font)
    if n is not None and n <= width:
        return text
    lo, hi = 0, len(text) - 1  # the longest prefix that fits with the ellipsis, between them
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n = _length(draw, text[:mid] + "…", font)
        if n is not None and n <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


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
        draw.text((lay.margin + 10, y + 7), _fit(draw, f"query: {q}", f_head, width - 60),
                  fill=(255, 255, 255), font=f_head)
        y += lay.header_h + 8
        qtile = thumbs_images.get(comparison.query_ids.get(q, ""), placeholder)
        for model in rows:
            label = "all (ensemble)" if model == ENSEMBLE else model
            draw.text((lay.margin + 4, y + lay.tile_h // 2 - 8), _fit(draw, label, f_label, lay.label_w - 12),
                      fill=(124, 45, 18) if model == ENSEMBLE else (31, 41, 55), font=f_label)
            _paste_tile(sheet, qtile, x0, y, lay)
            draw.text((x0, y + lay.tile_h + 3), _fit(draw, q, f_text, lay.tile_w), fill=(55, 65, 81),
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
                draw.text((x, y + lay.tile_h + 3), _fit(draw, f"{h.rank}. {h.name}", f_text, lay.tile_w),
                          fill=(17, 24, 39), font=f_text)
                score = f"{float(h.score):.3f}" + (f"  {c}/{n_models}" if n_models > 1 and c > 1 else "")
                draw.text((x, y + lay.tile_h + 18), score, fill=(107, 114, 128), font=f_small)
            y += lay.row_h
        y += lay.block_gap
    return sheet

