"""The report's whole-run data: every image's top-k (search box), 2-D maps, evaluation detail, run metadata."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flagsim.errors import FlagsimError
from flagsim.search.catalog import ENSEMBLE
from flagsim.search.source import Block
from flagsim.search.streamed import StreamedIndex

if TYPE_CHECKING:
    from flagsim.search.session import RunSearch

log = logging.getLogger(__name__)

#: Maps show at most this many images (a seeded random sample beyond it); the search box keeps all.
MAP_MAX = 5000
#: PCA is fitted on at most this many of the mapped images.
PCA_FIT = 20_000
#: Images whose neighbours are searched per call when a model has no neighbour table.
SEARCH_BATCH = 4096
#: query bytes per search of a streamed index (the ensemble of a subset of the models): each
#: search reads its shards once, so every image's top-k reads them N x 4 x dim / this times
STREAMED_QUERY_BYTES = 256 * 2**20
#: Record of the last `flagsim embed` (skipped models and reasons), under the run's `_meta/`.
EMBED_RECORD = "embed.json"


@dataclass(frozen=True)
class SearchTable:
    """Every image's top-k per model (and the ensemble), as positions into the catalogue."""

    ids: list[str]
    names: list[str]
    k: int
    neighbours: dict[str, np.ndarray]  # model -> [n, k] int32 catalogue positions, -1 = none
    scores: dict[str, np.ndarray]  # model -> [n, k] float32
    sources: dict[str, str]  # model -> "neighbour table" | "searched"


@dataclass(frozen=True)
class MapData:
    """One model's 2-D map: which images (catalogue positions) at which point."""

    model: str
    positions: np.ndarray  # [m] int catalogue positions of the mapped images
    xy: np.ndarray  # [m, 2] float32 in [0, 1]
    method: str  # "PCA", "UMAP", "t-SNE"
    total: int  # images the model has (m < total when sampled)
    explained: float | None = None  # PCA: share of the variance the two components keep


@dataclass(frozen=True)
class EvalRow:
    """One labelled query for one model: what was expected, what came back, hit@1 and hit@5."""

    model: str
    query: str
    expected: list[str]
    returned: list[str]
    hit1: bool
    hit5: bool


@dataclass(frozen=True)
class RunMeta:
    """The header: what the run holds and how it was made."""

    images: int
    models: list[dict[str, Any]]  # per embedded model: name, checkpoint, revision, device, dtype, dim, rows
    skipped: list[dict[str, str]]  # models skipped or failed at embed time, with the reason
    versions: dict[str, str]
    date: str
    notes: list[str] = field(default_factory=list)


# --- search table --------------------------------------------------------------------------------


def _positions(values: pa.Array | pa.ChunkedArray, catalogue_ids: pa.Array) -> np.ndarray:
    pos = pc.index_in(values, value_set=catalogue_ids)
    return pos.to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN


def _from_table(table: pa.Table, ids: pa.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(ids)
    nb = np.full((n, k), -1, np.int32)
    sc = np.zeros((n, k), np.float32)
    rank = table.column("rank").to_numpy()
    keep = (rank >= 1) & (rank <= k)
    if not keep.all():
        table = table.filter(pa.array(keep))
        rank = rank[keep]
    q = _positions(table.column("query_id"), ids)
    p = _positions(table.column("neighbour_id"), ids)
    ok = ~np.isnan(q) & ~np.isnan(p)
    qi, pi, r = q[ok].astype(np.int64), p[ok].astype(np.int32), rank[ok].astype(np.int64) - 1
    nb[qi, r] = pi
    sc[qi, r] = table.column("score").to_numpy()[ok]
    return nb, sc


def _searched(session: RunSearch, model: str, ids: pa.Array, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image's top-k searched: the stored vectors streamed shard by shard (no per-id lookup)."""
    from flagsim.search.source import source_of

    n = len(ids)
    nb = np.full((n, k), -1, np.int32)
    sc = np.zeros((n, k), np.float32)
    index = session.index(model)
    kk = min(k, index.count - 1)
    if kk < 1:
        return nb, sc
    to_cat = _positions(pa.array(index.ids.tolist(), pa.string()), ids)
    to_cat = np.where(np.isnan(to_cat), -1, to_cat).astype(np.int64)
    src = source_of(session.run, model, session.models) if model == ENSEMBLE else session.source(model)
    batch = SEARCH_BATCH
    if isinstance(index.index, StreamedIndex):  # each search is a pass over its shards
        batch = max(SEARCH_BATCH, STREAMED_QUERY_BYTES // (4 * max(index.dim, 1)))
    for qids, vectors in _batches(src, batch):
        scores, pos = index.search(vectors, kk, exclude=qids, normalised=True)
        r = _positions(pa.array(qids, pa.string()), ids)
        ok = ~np.isnan(r)
        valid = pos >= 0
        mapped = np.where(valid, to_cat[np.clip(pos, 0, None)], -1)
        nb[r[ok].astype(np.int64), :kk] = mapped[ok]
        sc[r[ok].astype(np.int64), :kk] = np.where(valid, scores, 0)[ok]
    return nb, sc


def _batches(blocks: Iterable[Block], rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, vectors) of `blocks` regrouped into batches of `rows` (the last one shorter)."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for block in blocks:
        ids += block.ids
        parts.append(block.vectors)
        while len(ids) >= rows:
            vectors = np.concatenate(parts) if len(parts) > 1 else parts[0]
            yield ids[:rows], vectors[:rows]
            ids, parts = ids[rows:], [vectors[rows:]]
    if ids:
        yield ids, np.concatenate(parts) if len(parts) > 1 else parts[0]


def search_table(session: RunSearch, k: int) -> SearchTable:
    """Every image's top-k for each model and `all`, from the neighbour tables where the run has
    them up to date (no search again), else searched through `session` in batches."""
    from flagsim.search.neighbours import read_neighbours, table_problem

    cat = session.catalogue
    ids = cat.ids
    neighbours, scores, sources = {}, {}, {}
    rows = [*session.models, ENSEMBLE] if session.has_ensemble else list(session.models)
    for m in rows:
        table = None
        if session.run.neighbours_manifest(m).exists():
            problem = table_problem(session.run, m, session.models)
            try:
                if problem is None:
                    table = read_neighbours(session.run.root.uri, m)
            except FlagsimError as exc:
                problem = f"unreadable ({exc})"
            if problem is not None:
                log.warning("report: the neighbour table of %s is %s; searching instead "
                            "(`flagsim neighbours` brings it up to date)", m, problem)
        if table is not None and table.num_rows and int(pc.max(table.column("rank")).as_py()) >= k:
            neighbours[m], scores[m] = _from_table(table, ids, k)
            sources[m] = "neighbour table"
        else:
            neighbours[m], scores[m] = _searched(session, m, ids, k)
            sources[m] = "searched"
        log.info("report: top-%d of %s: %s", k, m, sources[m])
    return SearchTable(ids.to_pylist(), cat.display.to_pylist(), k, neighbours, scores, sources)


# --- maps ----------------------------------------------------------------------------------------


def pca_2d(x: np.ndarray, fit: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Project rows of `x` on the two principal axes of `fit` (default `x`); returns (xy, explained)."""
    fit = x if fit is None else fit
    mean = fit.mean(axis=0, dtype=np.float64)
    centred = (fit - mean).astype(np.float32)
    if len(fit) < 2:
        return np.zeros((len(x), 2), np.float32), 0.0
    s, vt = _top_axes(centred, 2)
    axes = vt[:2]
    if axes.shape[0] < 2:
        axes = np.vstack([axes, np.zeros_like(axes[:1])])
    var = float(np.einsum("ij,ij->", centred, centred, dtype=np.float64))  # every axis's variance
    explained = float((s[:2].astype(np.float64) ** 2).sum() / var) if var > 0 else 0.0
    return ((x - mean).astype(np.float32) @ axes.T.astype(np.float32)), explained


#: Below this many rows or columns `_top_axes` takes the exact SVD; above, a randomized one.
EXACT_SVD_MAX = 64


def _top_axes(a: np.ndarray, n: int, oversample: int = 10, iterations: int = 6,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The `n` largest singular values of `a` and their right singular vectors (rows).

    A full SVD of a 3,000 x 6,375 map sample took 20 s per model on 2 cores; the randomized range
    finder with power iterations (Halko, Martinsson and Tropp 2011, as scikit-learn's
    `randomized_svd`) needs a few products with an (n + oversample)-column block: 0.3 s, and for
    the two leading axes of a map the same to plotting precision. Seeded: the same map each time.
    """
    rows, cols = a.shape
    if min(rows, cols) <= EXACT_SVD_MAX:
        _, s, vt = np.linalg.svd(a, full_matrices=False)
        return s[:n], vt[:n]
    width = min(n + oversample, rows, cols)
    y = a @ np.random.default_rng(seed).standard_normal((cols, width)).astype(a.dtype)
    for _ in range(iterations):  # power iterations, re-orthonormalised: the leading axes separate
        y, _ = np.linalg.qr(y)
        z, _ = np.linalg.qr(a.T @ y)
        y = a @ z
    q, _ = np.linalg.qr(y)
    _, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return s[:n], vt[:n]


def _scale(xy: np.ndarray) -> np.ndarray:
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return ((xy - lo) / span).astype(np.float32)


def other_projection() -> str | None:
    """The optional non-linear projection available here ("UMAP", "t-SNE") or None."""
    try:
        import umap  # noqa: F401

        return "UMAP"
    except ImportError:
        pass
    try:
        from sklearn.manifold import TSNE  # noqa: F401

        return "t-SNE"
    except ImportError:
        return None


def _nonlinear(method: str, x: np.ndarray) -> np.ndarray:
    if method == "UMAP":
        import umap

        return np.asarray(umap.UMAP(n_components=2, random_state=0).fit_transform(x), np.float32)
    from sklearn.manifold import TSNE

    perplexity = max(2.0, min(30.0, (len(x) - 1) / 3))
    return np.asarray(TSNE(n_components=2, random_state=0, perplexity=perplexity).fit_transform(x),
                      np.float32)


def map_data(session: RunSearch, table: SearchTable, map_max: int = MAP_MAX,
             projection: str = "auto", seed: int = 0) -> list[MapData]:
    """One map per model and the ensemble: PCA of each image's stored vector (a seeded sample of
    `map_max` images beyond that), plus UMAP/t-SNE when `projection` is "auto" and one is installed."""
    from flagsim.search.source import source_of

    extra = other_projection() if projection == "auto" else None
    cat_ids = pa.array(table.ids, pa.string())
    out: list[MapData] = []
    for m in table.neighbours:
        src = source_of(session.run, m, session.models) if m == ENSEMBLE else session.source(m)
        total = int(src.rows)
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=map_max, replace=False)) if total > map_max else np.arange(total)
        keep = np.zeros(total, bool)
        keep[chosen] = True
        vecs, vids, offset = [], [], 0
        for block in src:  # one shard at a time; only the mapped rows are kept
            sel = np.zeros(len(block.ids), bool)
            part = keep[offset:offset + len(block.ids)]
            sel[:len(part)] = part
            offset += len(block.ids)
            if sel.any():
                vecs.append(block.vectors[sel])
                vids += [i for i, s in zip(block.ids, sel, strict=True) if s]
        if not vecs:
            continue
        x = np.concatenate(vecs).astype(np.float32)
        pos = _positions(pa.array(vids, pa.string()), cat_ids)
        ok = ~np.isnan(pos)
        x, pos = x[ok], pos[ok].astype(np.int64)
        fit = x if len(x) <= PCA_FIT else x[np.random.default_rng(seed).choice(len(x), PCA_FIT, replace=False)]
        xy, explained = pca_2d(x, fit)
        out.append(MapData(m, pos, _scale(xy), "PCA", total, explained))
        if extra and len(x) > 5:
            try:
                out.append(MapData(m, pos, _scale(_nonlinear(extra, x)), extra, total))
            except Exception as exc:  # an optional library failing must not fail the report
                log.warning("report: %s map of %s failed: %s", extra, m, exc)
    return out


# --- evaluation detail ---------------------------------------------------------------------------


def eval_detail(session: RunSearch, pairs: str | None = None) -> list[EvalRow]:
    """Per labelled query and model (and `all`): expected names, the top-5 returned, hit@1/@5
    (the same searches as `flagsim eval`)."""
    from flagsim.search.evaluate import default_pairs_path, read_pairs, resolve_pairs

    cat = session.catalogue
    # the same rows as evaluate(), which has said what it left out
    resolved = resolve_pairs(cat, read_pairs(pairs), pairs or default_pairs_path()).pairs
    rows: list[EvalRow] = []
    for m in [*session.models, ENSEMBLE]:
        index = session.index(m)
        usable = [(q, [s for s in sims if s in index]) for q, sims in resolved if q in index]
        usable = [(q, sims) for q, sims in usable if sims]
        kmax = min(5, index.count - 1)
        if not usable or kmax < 1:
            continue
        qids = [q for q, _ in usable]
        _, pos = index.search(session.vectors(m, qids), kmax, exclude=qids, normalised=True)
        for (q, sims), prow in zip(usable, pos, strict=True):
            got = [str(index.ids[p]) for p in prow if p >= 0]
            rows.append(EvalRow(m, cat.name(q), [cat.name(s) for s in sims], [cat.name(g) for g in got],
                                bool(got[:1]) and got[0] in sims, any(g in sims for g in got[:5])))
    return rows


# --- run metadata --------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_meta(session: RunSearch) -> RunMeta:
    """Image count, each model's manifest (checkpoint, revision, device, dtype), the models the last
    `flagsim embed` skipped with their reasons (`_meta/embed.json`), versions and the date."""
    from flagsim import __version__
    from flagsim.shards import read_manifest

    run = session.run
    models = []
    for m in session.models:
        man = read_manifest(run, m)
        if man is None:
            continue
        models.append({"model": m, "checkpoint": man.checkpoint or "", "revision": man.revision or "",
                       "device": man.device, "dtype": man.dtype, "dim": man.dim, "rows": man.rows,
                       "source": man.source, "created": man.created})
    skipped: list[dict[str, str]] = []
    notes: list[str] = []
    record = run.meta / EMBED_RECORD
    if record.exists():
        try:
            data = record.read_json()
            skipped = [{"model": str(r.get("model", "")), "status": str(r.get("status", "")),
                        "reason": str(r.get("reason", ""))}
                       for r in data.get("results", []) if r.get("status") in ("skipped", "failed")]
        except (FlagsimError, ValueError, AttributeError) as exc:
            notes.append(f"embed record unreadable: {exc}")
    else:
        notes.append("no embed record in this run (made before flagsim recorded skipped models, or imported)")
    versions = {"flagsim": __version__, "torch": _version("torch"), "ray": _version("ray"),
                "faiss": _version("faiss-cpu") if _version("faiss-cpu") != "not installed" else _version("faiss")}
    return RunMeta(len(session.catalogue), models, skipped, versions,
                   time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), notes)


@dataclass(frozen=True)
class Explore:
    """The whole-run parts of the page: search data, maps, evaluation detail, header, thumbnails."""

    table: SearchTable
    maps: list[MapData] = field(default_factory=list)
    eval_rows: list[EvalRow] = field(default_factory=list)
    meta: RunMeta | None = None
    thumb_of: list[int] = field(default_factory=list)  # catalogue position -> index into thumbs, -1 none
    thumbs: list[str] = field(default_factory=list)  # distinct data: URIs
    # model -> (threshold, groups of (image id, name, cosine to the representative)), from dedup/
    dedup: dict[str, tuple[float, list[list[tuple[str, str, float]]]]] = field(default_factory=dict)


def page_data(ex: Explore) -> dict[str, Any]:
    """What the page's script reads: names, ids, each model's flat top-k (scores x1000), thumbnails."""
    from flagsim.console import plain

    t = ex.table
    n = len(t.ids)
    return {
        "k": t.k,
        "ensemble": ENSEMBLE,
        "models": list(t.neighbours),
        "ids": [plain(i) for i in t.ids],
        "names": [plain(s) for s in t.names],
        "nb": {m: a.reshape(-1).tolist() for m, a in t.neighbours.items()},
        "sc": {m: np.rint(a.reshape(-1) * 1000).astype(np.int32).tolist() for m, a in t.scores.items()},
        "thumb": list(ex.thumb_of) if len(ex.thumb_of) == n else [-1] * n,
        "thumbs": list(ex.thumbs),
    }


DEDUP_GROUPS_SHOWN = 100


def dedup_groups(session: RunSearch) -> dict[str, tuple[float, list[list[tuple[str, str, float]]]]]:
    """The near-duplicate groups `flagsim dedup` wrote for the run's models (first
    DEDUP_GROUPS_SHOWN per model, representative first); models without a table left out."""
    from flagsim.search.dedup import read_dedup

    run = session.run
    out: dict[str, tuple[float, list[list[tuple[str, str, float]]]]] = {}
    for m in [*session.models, ENSEMBLE]:
        if not run.dedup_manifest(m).exists():
            continue
        threshold = float(run.dedup_manifest(m).read_json().get("threshold", float("nan")))
        t = read_dedup(str(run.root), m)
        t = t.filter(pc.less(t.column("group"), DEDUP_GROUPS_SHOWN))
        groups: dict[int, list[tuple[str, str, float]]] = {}
        for g, i, n, sc in zip(t.column("group").to_pylist(), t.column("image_id").to_pylist(),
                               t.column("name").to_pylist(), t.column("score").to_pylist(), strict=True):
            groups.setdefault(g, []).append((i, n, float(sc)))
        out[m] = (threshold, [groups[g] for g in sorted(groups)])
    return out
