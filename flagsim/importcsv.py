"""Import embeddings saved by the original notebook (`Country,Flag Image,features` CSV) as shards."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from flagsim.errors import DataError
from flagsim.images import (
    bundled_table,
    images_table_hash,
    read_images_table,
    safe_stem,
    strip_footnotes,
    write_images_table,
)
from flagsim.inputfiles import check_input_file, open_csv
from flagsim.rundir import RunDir, shard_name
from flagsim.shards import (
    Manifest,
    discard_model,
    embeddings_table,
    read_manifest,
    write_manifest,
    write_shard,
)
from flagsim.storage import Location

log = logging.getLogger(__name__)

#: Model labels of the original experiment's files and result table -> flagsim model names.
ORIGINAL_LABELS = {
    "vit": "vit",
    "clip": "clip",
    "blip": "blip2",
    "blip2": "blip2",
    "dino-v2": "dinov2",
    "dinov2": "dinov2",
    "efficientnet": "efficientnet",
    "vgg16": "vgg16",
}

_MODEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._+-]{0,63}$")

#: Names that readers of the `model=<name>` folders turn into another value: polars reads
#: `true`/`false` as booleans and `nan`/`inf` as floats, DuckDB `inf`, `infinity` and `epoch` as
#: dates (a name starting with a digit, such as `2024`, `001` or `1e3`, reads as a number).
_VALUE_WORDS = frozenset({"true", "false", "nan", "inf", "infinity", "epoch"})


def check_model_name(model: str) -> None:
    """An imported model's name: a letter, then letters, digits and . _ + -; not `all` (the
    ensemble's) and not a word that readers of the `model=<name>` folders take for a value."""
    if not _MODEL_NAME.match(model) or model.lower() in _VALUE_WORDS:
        raise DataError(
            f"invalid model name {model!r}: use a letter, then letters, digits and . _ + - (at "
            "most 64 characters), and not true, false, nan, inf, infinity or epoch (readers of "
            "the model=<name> folders take those, and names starting with a digit, for values)"
        )
    if model.lower() == "all":
        raise DataError(f"the model name {model!r} is reserved for the ensemble of a run's models; "
                        "choose another")
_NUMBER_SPLIT = re.compile(r"[\s,\[\]]+")
SOURCE_PREFIX = "flagsim import-csv"


def model_from_label(label: str) -> str | None:
    """`DINO-v2` -> `dinov2`, `blip` -> `blip2`, ...; None for a label the original did not use."""
    return ORIGINAL_LABELS.get(label.strip().lower())


_ORIGINAL_FILE = re.compile(r"^national_flag_embeddings_(.+?)\.csv(\.gz)?$", re.IGNORECASE)


def model_from_filename(path: str) -> str | None:
    """`national_flag_embeddings_DINO-v2.csv.gz` -> `dinov2`: the original files' naming."""
    m = _ORIGINAL_FILE.match(Location.parse(path).name)
    return model_from_label(m.group(1)) if m else None


def parse_features(text: str, where: str) -> np.ndarray:
    """numpy's printed text of a 1xD (or D) array -> float64 vector of D values.

    Brackets, commas and line breaks are accepted; numpy's `...` summarisation is refused.
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty features")
    if "..." in text:
        raise DataError(
            f"{where}: features were summarised by numpy ('...'); re-save them with "
            "np.set_printoptions(threshold=sys.maxsize)"
        )
    if text.count("[") > 2:
        raise DataError(f"{where}: features hold more than one row; expected a 1xD array")
    tokens = [t for t in _NUMBER_SPLIT.split(text) if t]
    try:
        vec = np.array(tokens, dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{where}: features are not numbers ({exc})") from None
    if vec.size == 0:
        raise DataError(f"{where}: no numbers in features")
    if not np.isfinite(vec).all():
        raise DataError(f"{where}: features hold NaN or Inf")
    return vec


@dataclass(frozen=True)
class ImportResult:
    model: str
    rows: int
    dim: int
    shards: int
    images_table: str  # "kept" | "written" | "none"
    not_in_images: int  # imported ids missing from the run's images table
    up_to_date: bool = False  # the same file was imported already: nothing written


@dataclass
class _Parsed:
    ids: list[str]
    names: list[str]
    matrix: np.ndarray  # [rows, dim] float32


def _parse(src: Location, model: str, chunk_rows: int) -> _Parsed:
    """Read `src` record by record (gzip streamed), converting features in float32 blocks.

    Memory holds the float32 vectors and ids, never the file's text: a bad row or a
    dimension disagreeing with the registry is refused as soon as it is read.
    """
    from flagsim.search.catalog import model_dim

    expected = model_dim(model)
    ids: list[str] = []
    names: list[str] = []
    blocks: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    seen: dict[str, int] = {}
    dim = 0
    with open_csv(src, "embedding file") as reader:
        fields = reader.fieldnames
        for col in ("Country", "features"):
            if col not in fields:
                raise DataError(
                    f"{src} has no '{col}' column (columns: {', '.join(fields) or 'none'}); "
                    "expected the original format Country,Flag Image,features"
                )
        for line, rec in enumerate(reader, start=2):
            country = (rec.get("Country") or "").strip()
            where = f"{src}: row {line}" + (f" ({country})" if country else "")
            if not country:
                raise DataError(f"{where}: empty Country")
            image_id = safe_stem(country)
            if image_id.casefold() in seen:
                raise DataError(
                    f"{where}: same image id {image_id!r} as row {seen[image_id.casefold()]}"
                )
            seen[image_id.casefold()] = line
            vec = parse_features(rec.get("features") or "", where)
            if not dim:
                dim = int(vec.size)
                if expected is not None and expected != dim:
                    raise DataError(
                        f"{src}: {dim}-d embeddings, but model {model} is {expected}-d; "
                        "pick the matching --model (or a new name for another model)"
                    )
            elif vec.size != dim:
                raise DataError(f"{where}: {vec.size} values, but the first row has {dim}")
            ids.append(image_id)
            names.append(strip_footnotes(country))
            pending.append(vec)
            if len(pending) >= chunk_rows:
                blocks.append(np.stack(pending).astype(np.float32))
                pending = []
    if pending:
        blocks.append(np.stack(pending).astype(np.float32))
    if not ids:
        raise DataError(f"{src} holds no rows")
    if expected is None:
        log.info("%s is not a registered model: importing as an external model", model)
    return _Parsed(ids, names, np.concatenate(blocks))


def file_stamp(src: Location) -> dict[str, str | int]:
    """What identifies an imported file: its name, sha256 and size (recorded in the manifest)."""
    digest = hashlib.sha256()
    size = 0
    with src.fs.open_input_stream(src.path, compression=None) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"source_file": src.name, "source_sha256": digest.hexdigest(), "source_bytes": size}


def _up_to_date(
    run: RunDir, model: str, stamp: dict, checkpoint: str | None, revision: str | None
) -> Manifest | None:
    """The manifest when `model` was imported from the same bytes with the same weights."""
    try:
        manifest = read_manifest(run, model)
    except DataError:
        return None
    if manifest is None or not is_imported(manifest):
        return None
    same_file = all(
        manifest.processor.get(k) == stamp[k] for k in ("source_sha256", "source_bytes")
    )
    same_weights = (manifest.checkpoint, manifest.revision) == (checkpoint, revision)
    shards = {loc.name for loc in run.model_dir(model).list(".parquet")}
    return manifest if same_file and same_weights and shards == set(manifest.shards) else None


def import_csv(
    file: str,
    model: str,
    run_dir: str,
    *,
    checkpoint: str | None = None,
    revision: str | None = None,
    shard_size: int = 1000,
    force: bool = False,
    images: bool = True,
) -> ImportResult:
    """Write `file`'s embeddings as `embeddings/model=<model>/` shards plus a manifest (last).

    `model` may be any safe name; a registered model's dimension must match. `checkpoint` and
    `revision` record which weights made the vectors (then `flagsim query` can embed new
    images with them). With `images`, a run without images.parquet gets one from the bundled
    flags when every imported id is among them. The manifest records the file's sha256 and
    size: importing the same bytes again is a no-op ("up to date"); other bytes need `force`.
    """
    check_model_name(model)
    src = Location.parse(file)
    check_input_file(src, "embedding file")
    stamp = file_stamp(src)
    run = RunDir.at(run_dir)
    existing = run.model_dir(model).exists() and bool(run.model_dir(model).list())
    if existing and not force:
        done = _up_to_date(run, model, stamp, checkpoint, revision)
        if done is not None:
            log.info("%s is up to date: already imported from %s (sha256 %s)",
                     run.model_dir(model), src.name, str(stamp["source_sha256"])[:12])
            state = "kept" if run.images_table.exists() else "none"
            return ImportResult(model, done.rows, done.dim, len(done.shards), state, 0, True)
        raise DataError(
            f"{run.model_dir(model)} already holds embeddings of {model}; pass --force to replace them"
        )

    parsed = _parse(src, model, shard_size)
    ids, names, matrix = parsed.ids, parsed.names, parsed.matrix
    dim = int(matrix.shape[1])

    from flagsim.runlock import run_lock

    with run_lock(run.root, "flagsim import-csv"):  # one writer per run
        if existing:  # only now that the file is known to be good
            discard_model(run, model)
        images_state, not_in = _images_table(run, ids, images)
        table = read_images_table(run.images_table) if run.images_table.exists() else None
        images_hash = images_table_hash(table) if table is not None else "none"

        shards: dict[str, int] = {}
        for index, start in enumerate(range(0, len(ids), shard_size)):
            stop = min(start + shard_size, len(ids))
            tab = embeddings_table(ids[start:stop], names[start:stop], model, matrix[start:stop])
            write_shard(run, model, index, tab)
            shards[shard_name(index)] = tab.num_rows
        write_manifest(run, Manifest(
            model=model, dim=dim, rows=len(ids), images_hash=images_hash, shards=shards,
            checkpoint=checkpoint, revision=revision, dtype="float32", device="unknown",
            processor=stamp, shard_size=shard_size, source=f"{SOURCE_PREFIX} {src.name}",
        ))
    log.info("imported %d %d-d embeddings of %s from %s into %s", len(ids), dim, model, src,
             run.model_dir(model))
    return ImportResult(model, len(ids), dim, len(shards), images_state, not_in)


def _images_table(run: RunDir, ids: list[str], write: bool) -> tuple[str, int]:
    """Keep the run's images table, or write the bundled flags' rows for `ids` when all match."""
    if run.images_table.exists():
        table = read_images_table(run.images_table)
        have = set(table.column("image_id").to_pylist())
        missing = [i for i in ids if i not in have]
        if missing:
            log.warning("%d imported id(s) are not in %s (e.g. %s): no images for them in reports",
                        len(missing), run.images_table, ", ".join(missing[:3]))
        return "kept", len(missing)
    if not write:
        return "none", len(ids)
    bundled = bundled_table()
    pos = {i: p for p, i in enumerate(bundled.column("image_id").to_pylist())}
    missing = [i for i in ids if i not in pos]
    if missing:
        log.info("no images table written: %d imported id(s) are not bundled flags (e.g. %s)",
                 len(missing), ", ".join(missing[:3]))
        return "none", len(ids)
    write_images_table(bundled.take(pa.array([pos[i] for i in ids])), run)
    return "written", 0


def is_imported(manifest: Manifest) -> bool:
    return manifest.source.startswith((SOURCE_PREFIX, "flagsim import-embeddings"))
