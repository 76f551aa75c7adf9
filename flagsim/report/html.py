"""The report page: one self-contained HTML file (images as data: URIs, the CSS inlined, no scripts)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from flagsim.console import plain
from flagsim.report.data import row_models, support
from flagsim.search.catalog import ENSEMBLE

if TYPE_CHECKING:
    import pandas as pd

    from flagsim.search.compare import Comparison

#: Content-Security-Policy of the page: no scripts, no network, images only from data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def esc(value: Any) -> str:
    """HTML-escape any value for element text or a double-quoted attribute. Control characters
    (NUL, ESC, DEL, C1, bidi overrides) are written as visible escapes such as `\\x00`: HTML
    forbids them and a browser may act on them."""
    return html.escape(plain(value), quote=True)


@cache
def stylesheet() -> str:
    """The page's CSS (package data `flagsim/report/report.css`), inlined into every page."""
    return files("flagsim.report").joinpath("report.css").read_text(encoding="utf-8")


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
        f"<style>\n{stylesheet()}</style></head><body>",
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

