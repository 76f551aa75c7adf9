"""The report page: one self-contained HTML file (images as data: URIs, CSS and its one script inlined)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from flagsim.console import plain
from flagsim.report.data import row_models, support
from flagsim.report.explore import EvalRow, Explore, MapData, RunMeta, page_data
from flagsim.report.script import SCRIPT, script_hash
from flagsim.search.catalog import ENSEMBLE

if TYPE_CHECKING:
    import pandas as pd

    from flagsim.search.compare import Comparison

#: Content-Security-Policy of the page: no network, images only from data: URIs, and no script
#: but the page's own (allowed by its sha256, see `page_csp`).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def page_csp() -> str:
    """`CSP` plus `script-src` naming the hash of the page's one inline script."""
    return f"{CSP}; script-src {script_hash(SCRIPT)}"


def json_block(obj: Any) -> str:
    """JSON safe inside `<script type="application/json">`: `<`, `>` and `&` escaped (no `</script>`)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


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
    explore: Explore | None = None,
) -> str:
    """The report page. `thumbs` maps image id -> `data:` URI; every name is HTML-escaped.

    Ids without a thumbnail get a "no image" tile; `notes` (e.g. skipped queries) are shown
    at the top, and `eval_note` in place of the evaluation table when `eval_df` is None.
    `explore` adds the run header, the search box over every image (its data embedded as JSON),
    the maps and the evaluation detail, and the page's one script (allowed by its hash).
    """
    models = list(comparison.models)
    meta = subtitle or f"models: {', '.join(models)} · top-{comparison.k} neighbours by cosine similarity"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(page_csp() if explore else CSP)}">',
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
    if explore:
        toc = ['<a href="#run">run</a>', '<a href="#search-section">search</a>',
               '<a href="#maps">maps</a>', *toc, '<a href="#eval-detail">evaluation detail</a>',
               *(['<a href="#dedup">near-duplicates</a>'] if explore.dedup else [])]
    parts.append(f'<nav class="toc">{"".join(toc)}</nav>')
    if explore:
        if explore.meta:
            parts.append(_meta_section(explore.meta))
        parts.append(_search_section(explore))
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
    if explore:
        parts.append(_eval_detail_section(explore.eval_rows))
        parts.append(_maps_section(explore))
        if explore.dedup:
            parts.append(_dedup_section(explore))
    parts.append("</main><footer>Generated by flagsim report. Self-contained: all images and data are "
                 "embedded; the page loads nothing from the network.</footer>")
    if explore:
        parts.append(f'<script type="application/json" id="flagsim-data">{json_block(page_data(explore))}'
                     "</script>")
        parts.append(f"<script>{SCRIPT}</script>")
    parts.append("</body></html>\n")
    return "\n".join(parts)



# --- whole-run sections ---------------------------------------------------------------------------


def _meta_section(meta: RunMeta) -> str:
    out = ['<section class="card" id="run" data-section="run">', "<h2>Run</h2>",
           f'<p class="legend">{esc(meta.images)} images · generated {esc(meta.date)} · '
           + " · ".join(f"{esc(k)} {esc(v)}" for k, v in meta.versions.items()) + "</p>",
           '<table class="eval" data-meta="models"><thead><tr>']
    cols = ["model", "checkpoint", "revision", "device", "dtype", "dim", "rows", "source"]
    out.extend(f'<th scope="col">{esc(c)}</th>' for c in cols)
    out.append("</tr></thead><tbody>")
    for rec in meta.models:
        out.append(f'<tr data-model="{esc(rec["model"])}">'
                   + "".join(f"<td>{esc(rec.get(c, ''))}</td>" for c in cols) + "</tr>")
    out.append("</tbody></table>")
    if meta.skipped:
        out.append('<p class="legend">Models not embedded in the last <code>flagsim embed</code>:</p>'
                   '<ul class="skipped" data-list="skipped">')
        out.extend(f'<li data-model="{esc(r["model"])}"><b>{esc(r["model"])}</b> ({esc(r["status"])}): '
                   f'{esc(r["reason"])}</li>' for r in meta.skipped)
        out.append("</ul>")
    elif not meta.notes:  # an embed record exists and lists no skipped model
        out.append('<p class="legend" data-list="skipped">No model was skipped.</p>')
    out.extend(f'<p class="legend">{esc(n)}</p>' for n in meta.notes)
    out.append("</section>")
    return "\n".join(out)


def _search_section(ex: Explore) -> str:
    t = ex.table
    sources = ", ".join(f"{m}: {s}" for m, s in t.sources.items())
    return "\n".join([
        '<section class="card" id="search-section" data-section="search">',
        "<h2>Find an image</h2>",
        f'<p class="legend">All {len(t.ids)} images: type a name (or id) to see its top-{t.k} per model '
        f"and for the ensemble; link to one with <code>#q=NAME</code>. ({esc(sources)})</p>",
        '<input id="search" type="search" autocomplete="off" spellcheck="false" '
        'placeholder="image name" aria-label="image name">',
        '<span id="search-status" class="legend" role="status"></span>',
        '<div id="suggest" class="suggest"></div>',
        '<div id="result" class="result" aria-live="polite"></div>',
        "</section>",
    ])


def _map_figure(mp: MapData, names: Sequence[str], size: int = 1000) -> str:
    label = "all (ensemble)" if mp.model == ENSEMBLE else mp.model
    shown = len(mp.positions)
    sampled = f"a seeded sample of {shown} of {mp.total} images" if shown < mp.total else f"all {shown} images"
    extra = f", the two axes keep {mp.explained:.0%} of the variance" if mp.explained is not None else ""
    r = 6 if shown <= 500 else 4 if shown <= 3000 else 3
    marks = []
    for p, (x, y) in zip(mp.positions.tolist(), mp.xy.tolist(), strict=True):
        cx, cy = round(12 + x * (size - 24)), round(12 + (1 - y) * (size - 24))
        marks.append(f'<circle cx="{cx}" cy="{cy}" r="{r}" data-i="{p}"><title>{esc(names[p])}</title></circle>')
    return "\n".join([
        f'<figure class="map" data-model="{esc(mp.model)}" data-method="{esc(mp.method)}" '
        f'data-marks="{shown}" data-total="{mp.total}">',
        f'<svg class="map" viewBox="0 0 {size} {size}" role="img" aria-label="{esc(label)} {esc(mp.method)} map">',
        "".join(marks),
        "</svg>",
        f"<figcaption><b>{esc(label)}</b> · {esc(mp.method)} of the stored embeddings{esc(extra)}; "
        f"{esc(sampled)}. Hover a dot for its name and neighbours, click to open it.</figcaption>",
        '<p class="mapinfo legend"></p>',
        "</figure>",
    ])


def _dedup_section(ex: Explore) -> str:
    """`flagsim dedup`'s groups per model: the representative first, each member's cosine to it."""
    out = ['<section class="card" id="dedup" data-section="dedup">', "<h2>Near-duplicates</h2>",
           '<p class="legend">Groups of images whose neighbour pairs reach the model\'s '
           "near-duplicate cosine (<code>flagsim dedup</code>); the first image is the group's "
           "representative.</p>"]
    for model, (threshold, groups) in ex.dedup.items():
        out.append(f'<h3>{esc(model)} <span class="legend">cosine &ge; {esc(_fmt(threshold, 4))}, '
                   f"{len(groups)} group(s) shown</span></h3>")
        if not groups:
            out.append('<p class="legend">No near-duplicates.</p>')
            continue
        out.append(f'<ol class="dedup" data-model="{esc(model)}">')
        for g in groups:
            members = ", ".join(f'<span class="dup" data-id="{esc(i)}">{esc(n)} '
                                f'<span class="score">{esc(_fmt(sc, 4))}</span></span>' for i, n, sc in g)
            out.append(f"<li>{members}</li>")
        out.append("</ol>")
    out.append("</section>")
    return "\n".join(out)


def _maps_section(ex: Explore) -> str:
    out = ['<section class="card" id="maps" data-section="maps">', "<h2>Maps</h2>"]
    if not ex.maps:
        out.append('<p class="legend">No map (no stored vectors).</p>')
    out.append('<div class="maps">')
    out.extend(_map_figure(mp, ex.table.names) for mp in ex.maps)
    out.append("</div></section>")
    return "\n".join(out)


def _chart(rows: Sequence[EvalRow]) -> str:
    """Two bars (hit@1, hit@5) of one model, as inline SVG."""
    n = len(rows) or 1
    bars = []
    for j, (label, v) in enumerate((("hit@1", sum(r.hit1 for r in rows) / n),
                                    ("hit@5", sum(r.hit5 for r in rows) / n))):
        y = 6 + j * 22
        bars.append(f'<text x="0" y="{y + 13}">{label}</text>'
                    f'<rect x="44" y="{y}" width="160" height="16" fill="#e5e7eb"></rect>'
                    f'<rect x="44" y="{y}" width="{round(160 * v)}" height="16" fill="#60a5fa"></rect>'
                    f'<text x="210" y="{y + 13}">{v:.2f}</text>')
    return f'<svg class="chart" viewBox="0 0 250 52" width="250" height="52" role="img">{"".join(bars)}</svg>'


def _eval_detail_section(rows: Sequence[EvalRow]) -> str:
    out = ['<section class="card" id="eval-detail" data-section="eval-detail">',
           "<h2>Evaluation detail</h2>"]
    if not rows:
        out.append('<p class="legend">No labelled query is in this run.</p></section>')
        return "\n".join(out)
    out.append('<p class="legend">Per labelled query: the images expected to be similar, what the '
               "model returned (top 5, expected ones marked), and hit or miss at 1 and 5.</p>")
    by_model: dict[str, list[EvalRow]] = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    for m, mrows in by_model.items():
        label = "all (ensemble)" if m == ENSEMBLE else m
        out.append(f'<details class="evalm" data-model="{esc(m)}"><summary><b>{esc(label)}</b> '
                   f"{_chart(mrows)}</summary>")
        out.append('<table class="eval"><thead><tr><th>query</th><th>expected</th><th>returned</th>'
                   "<th>@1</th><th>@5</th></tr></thead><tbody>")
        for r in mrows:
            exp = set(r.expected)
            got = ", ".join(f"<mark>{esc(g)}</mark>" if g in exp else esc(g) for g in r.returned)
            out.append(f'<tr data-query="{esc(r.query)}" data-hit1="{int(r.hit1)}" data-hit5="{int(r.hit5)}">'
                       f"<td>{esc(r.query)}</td><td>{esc(', '.join(r.expected))}</td><td>{got}</td>"
                       f'<td class="{"hit" if r.hit1 else "miss"}">{"hit" if r.hit1 else "miss"}</td>'
                       f'<td class="{"hit" if r.hit5 else "miss"}">{"hit" if r.hit5 else "miss"}</td></tr>')
        out.append("</tbody></table></details>")
    out.append("</section>")
    return "\n".join(out)
