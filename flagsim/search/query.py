"""Answer one query (an image's name or an image file) with the top-k of each model and the ensemble,
or a text with the top-k of each model that has a text tower."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flagsim.config import Config
from flagsim.errors import DataError, FlagsimError, WeightsUnavailableError
from flagsim.images import IMAGE_SUFFIXES
from flagsim.rundir import RunDir
from flagsim.search.catalog import ENSEMBLE, Catalogue
from flagsim.search.model_index import Hit
from flagsim.search.session import RunSearch
from flagsim.search.vectors import ensemble_vectors
from flagsim.shards import Manifest
from flagsim.storage import Location

log = logging.getLogger(__name__)


#: Prefixes that make a query a file path even when the rest is an image id (`./a/x`).
PATH_PREFIXES = ("./", "../", "/", "~", ".\\")


def is_image_query(text: str, catalogue: Catalogue) -> bool:
    """Whether a query is an image file rather than one of the run's images.

    The rule: an image id or name of the run is that image (so `a/x`, the id of `a/x.png` in a
    sub-folder, is not read as a path); `./a/x`, an absolute path or a URI is always a file;
    anything else is a file when it looks like one (see `looks_like_image`).
    """
    if not text.startswith(PATH_PREFIXES) and "://" not in text and catalogue.knows(text):
        return False
    return looks_like_image(text)


def looks_like_image(text: str) -> bool:
    """True when `text` should be read as an image file rather than a name (an image suffix, a
    path separator, a URI or an existing file)."""
    if "://" in text or text.lower().endswith(IMAGE_SUFFIXES):
        return True
    if "/" in text or "\\" in text:
        return True
    try:
        return Location.parse(text).is_file()
    except DataError:
        return False


# --- results ---------------------------------------------------------------------------------


@dataclass
class QueryResult:
    """Top-k per model (and the ensemble under "all") for one query."""

    query: str  # what was asked
    kind: str  # "name" | "image" | "text"
    query_id: str | None  # the image id for name queries (and image queries found in the run)
    query_name: str | None
    k: int
    models: list[str]
    results: dict[str, list[Hit]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # model -> one-line reason

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query, "kind": self.kind, "query_id": self.query_id,
            "query_name": self.query_name, "k": self.k, "models": self.models,
            "results": {
                m: [{"rank": h.rank, "image_id": h.image_id, "name": h.name, "score": round(h.score, 6)}
                    for h in hits]
                for m, hits in self.results.items()
            },
            "skipped": self.skipped,
        }


def query(
    run_dir: str, text: str, k: int = 5, models: Sequence[str] | None = None,
    cfg: Config | None = None, ensemble: bool = True, as_image: bool | None = None,
) -> QueryResult:
    """Top-k neighbours of `text` (a name in the run, or an image file) for each model.

    `text` is read as in `is_image_query` (an id or name of the run first), unless `as_image`
    says which it is. Name queries exclude the image itself. Image files are decoded with the
    pipeline's decoder and embedded with each queried model's own preprocessing and recorded
    weights; an image whose bytes equal one of the run's images takes that image's stored
    embeddings instead (no model is built) and is excluded from its own results, like a name.
    The ensemble ("all") ranks by mean cosine over the models answered, when there are two or more.
    """
    cfg = cfg or Config()
    run = RunDir.at(run_dir)
    session = RunSearch(run, models, cfg)
    cat = session.catalogue
    image = is_image_query(text, cat) if as_image is None else as_image
    if image:
        return _image_query(session, text, k, cfg, ensemble)
    image_id = cat.resolve(text)
    result = QueryResult(text, "name", image_id, cat.name(image_id), k, session.models)
    answered: list[str] = []
    for m in session.models:
        if not session.contains(m, image_id):
            result.skipped[m] = f"{cat.name(image_id)} is not among its embeddings"
            continue
        session.index(m).check_k(k)
        result.results[m] = session.hits(m, [image_id], k)[0]
        answered.append(m)
    if ensemble and len(answered) > 1:
        ens_session = session if answered == session.models else RunSearch(run, answered, cfg)
        ens = ens_session.index(ENSEMBLE)
        if image_id in ens:
            ens.check_k(k)
            result.results[ENSEMBLE] = ens_session.hits(ENSEMBLE, [image_id], k)[0]
    if not result.results:
        raise DataError(f"no model could answer {text!r}: " + _grouped(result.skipped))
    return result


def _image_query(session: RunSearch, path: str, k: int, cfg: Config, ensemble: bool) -> QueryResult:
    from flagsim.decode import DecodeError, decode_image
    from flagsim.inputfiles import check_input_file

    run = session.run
    loc = Location.parse(path)
    check_input_file(loc, "image file")  # a directory or device said as one, a FIFO never opened
    data = loc.read_bytes()
    try:
        pixels = decode_image(data, max_pixels=cfg.embed.max_image_pixels)
    except DecodeError as exc:
        raise DataError(f"image file {path}: {exc}") from None
    self_id = _same_image(run, data)
    cat = session.catalogue
    result = QueryResult(path, "image", self_id, cat.name(self_id) if self_id else None, k,
                         session.models)
    vectors: dict[str, np.ndarray] = {}
    for m in session.models:
        try:
            if self_id is not None and session.contains(m, self_id):
                vec = session.vectors(m, [self_id])  # the same bytes: no model to build
            else:
                vec = embed_like(m, session.manifest(m), pixels)
        except (FlagsimError, OSError) as exc:
            _skip(result, m, exc)
            continue
        idx = session.index(m)
        idx.check_k(k, exclude_self=self_id is not None)
        exclude = [self_id] if self_id else None
        result.results[m] = idx.hits(vec, k, exclude=exclude)[0]
        vectors[m] = vec
    if ensemble and len(vectors) > 1:
        answered = list(vectors)
        ens_session = session if answered == session.models else RunSearch(run, answered, cfg)
        ens = ens_session.index(ENSEMBLE)
        ens.check_k(k, exclude_self=self_id is not None)
        result.results[ENSEMBLE] = ens.hits(
            ensemble_vectors(vectors), k, exclude=[self_id] if self_id else None
        )[0]
    if not result.results:
        raise DataError(f"no model could embed {path}: " + _grouped(result.skipped))
    return result


def query_text(
    run_dir: str, text: str, k: int = 5, models: Sequence[str] | None = None,
    cfg: Config | None = None,
) -> QueryResult:
    """Top-k images of the run for `text`, for each queried model that has a text tower.

    The text is embedded by the model's text tower alone (for CLIP, what
    `CLIPModel.get_text_features` gives), loaded from the checkpoint and revision recorded in
    that model's manifest, on CPU, and searched against the stored image embeddings by
    cosine. `models` None (or ["all"]) means the run's models with a text tower; a model named
    explicitly that has none is a one-line DataError, as is a run with none. There is no
    ensemble: the other models cannot embed text. A model whose text tower cannot be loaded
    (imported without a checkpoint, weights or tokenizer unavailable) is skipped with a note.
    """
    from flagsim.models import has_text_tower, no_text_tower, text_models

    cfg = cfg or Config()
    if not text.strip():
        raise DataError("the text query is empty")
    run = RunDir.at(run_dir)
    named = [m for m in models or () if m != ENSEMBLE]
    for m in named:
        if not has_text_tower(m):
            raise no_text_tower(m)
    if not named:
        present = RunSearch(run, None, cfg).models
        named = [m for m in present if has_text_tower(m)]
        if not named:
            raise DataError(
                f"no model of {run.root} has a text tower (text queries work with: "
                f"{', '.join(text_models()) or 'none'}; models present: {', '.join(present)})"
            )
    session = RunSearch(run, named, cfg)
    result = QueryResult(text, "text", None, None, k, session.models)
    for m in session.models:
        try:
            vec = embed_text_like(m, session.manifest(m), text)
        except (FlagsimError, OSError) as exc:
            _skip(result, m, exc)
            continue
        idx = session.index(m)
        idx.check_k(k, exclude_self=False)
        result.results[m] = idx.hits(vec, k)[0]
    if not result.results:
        raise DataError(f"no model could embed the text {text!r}: " + _grouped(result.skipped))
    return result


def embed_text_like(model: str, manifest: Manifest, text: str) -> np.ndarray:
    """Embed `text` with the text tower of the weights recorded in `model`'s manifest ([1, dim]),
    as `embed_like` embeds an image; a FlagsimError with one line when that is not possible."""
    from flagsim.importcsv import is_imported
    from flagsim.models import create_text_encoder

    if is_imported(manifest) and not manifest.checkpoint:
        raise DataError(
            "embeddings were imported without --checkpoint, so the weights that made them are unknown"
        )
    encoder = create_text_encoder(
        model, weights=manifest.checkpoint, revision=manifest.revision, device="cpu"
    )
    vec = np.asarray(encoder.text_features([text]), dtype=np.float32).reshape(1, -1)
    if vec.shape[1] != manifest.dim:
        raise DataError(
            f"the text tower gives {vec.shape[1]}-d vectors, the stored ones are {manifest.dim}-d"
        )
    return vec


def _skip(result: QueryResult, model: str, exc: BaseException) -> None:
    """Record why `model` could not answer (its error's first line)."""
    line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    result.skipped[model] = line.removeprefix(f"{model}: ")  # listed under the model's name
    log.debug("skipping %s: %s", model, exc)


def _grouped(skipped: dict[str, str]) -> str:
    """`a, b: reason; c: other reason` (models with the same reason listed together)."""
    by_reason: dict[str, list[str]] = {}
    for m, reason in skipped.items():
        by_reason.setdefault(reason, []).append(m)
    return "; ".join(f"{', '.join(ms)}: {reason}" for reason, ms in by_reason.items())


def _same_image(run: RunDir, data: bytes) -> str | None:
    """The id of the run's image with exactly these bytes, if the run has an images table."""
    if not run.images_table.exists():
        return None
    from flagsim.images import read_images_table

    table = read_images_table(run.images_table)
    digest = hashlib.sha256(data).hexdigest()
    for i, h in zip(table.column("image_id").to_pylist(), table.column("sha256").to_pylist(),
                    strict=True):
        if h == digest:
            return i
    return None


def embed_like(model: str, manifest: Manifest, pixels: np.ndarray) -> np.ndarray:
    """Embed one decoded image the way `model`'s stored embeddings were made ([1, dim]).

    Uses the weights recorded in the model's manifest; raises a FlagsimError with one line
    when that is not possible (imported without a checkpoint, weights unavailable, ...).
    """
    from flagsim.importcsv import is_imported

    if is_imported(manifest) and not manifest.checkpoint:
        raise DataError(
            "embeddings were imported without --checkpoint, so the weights that made them are unknown"
        )
    try:
        from flagsim.models import check_weights, create_embedder
    except ImportError as exc:  # pragma: no cover - the registry is part of the package
        raise DataError(f"{model}: model registry unavailable ({exc})") from None
    # the same answer as `flagsim models`, within seconds: loading would retry an unreachable
    # hub for half a minute and then blame the repository
    reason = check_weights(model, manifest.checkpoint, manifest.revision)
    if reason:
        raise WeightsUnavailableError(reason)
    embedder = create_embedder(
        model, weights=manifest.checkpoint, revision=manifest.revision, device="cpu"
    )
    vec = np.asarray(embedder([pixels]), dtype=np.float32).reshape(1, -1)
    if vec.shape[1] != manifest.dim:
        raise DataError(
            f"the model now gives {vec.shape[1]}-d vectors, the stored ones are {manifest.dim}-d"
        )
    return vec
