"""Build the images table from the bundled flags, a folder, or a CSV in the seed's format."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from flagsim.errors import DataError
from flagsim.inputfiles import file_problem, is_parquet_file, open_csv
from flagsim.rundir import RunDir, shard_index
from flagsim.schema import (
    ERRORS_SCHEMA,
    IMAGE_REF_COLUMNS,
    IMAGES_SCHEMA,
    check_columns,
    conform,
    with_optional,
)
from flagsim.storage import Location

log = logging.getLogger(__name__)

# Pillow warns (a raw `warnings.warn(` line on the console) when it opens an image over its pixel
# limit; a header read (listing a folder, checking a download) only needs the size, and the
# limit is enforced, in one line, where an image is decoded (`decode_image` turns the warning
# into its error inside its own context). Process-wide: `catch_warnings` is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: Pillow formats that it lists but cannot decode to pixels here (stubs, header-only, or a
#: helper program/OS needed).
_NOT_DECODABLE = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "EPS", "WMF"})


def _image_suffixes() -> tuple[str, ...]:
    """The extensions of every format this Pillow can open (AVIF, WebP, ...), plus `.svg`.

    SVG is listed so that a vector flag gets an error row ("rasterise it first") rather
    than being skipped unseen.
    """
    registered = Image.registered_extensions()  # loads every plugin first
    openable = set(Image.OPEN) - _NOT_DECODABLE
    exts = {ext.lower() for ext, fmt in registered.items() if fmt in openable}
    return tuple(sorted(exts | {".svg"}))


IMAGE_SUFFIXES = _image_suffixes()
_FOOTNOTE = re.compile(r"\[[^\]]{1,12}\]")
_FORBIDDEN = set('/\\\x00:*?"<>|')
#: Longest file stem in UTF-8 bytes: with `_N` and an extension a name stays within 200 bytes
#: (filesystems allow 255 bytes; 150 Cyrillic letters are 300).
MAX_STEM_BYTES = 180


def bundled_flags_dir() -> Path:
    """The 197 real flag PNGs and CSVs shipped inside the package."""
    return Path(str(resources.files("flagsim") / "data" / "flags"))


def safe_stem(name: str) -> str:
    """File stem for `name`, following the seed's rule (spaces → `_`, `[`/`]` removed).

    Also NFC-normalises, drops path separators, control and shell-hostile characters, and
    leading dots, so the result can never escape its folder; a stem over MAX_STEM_BYTES is
    cut and ends in 8 hex digits of the full name's hash, so cut names stay distinct.
    """
    s = unicodedata.normalize("NFC", name).strip()
    s = s.replace(" ", "_").replace("[", "").replace("]", "")
    s = "".join(c for c in s if c not in _FORBIDDEN and unicodedata.category(c)[0] != "C")
    s = s.lstrip(".")
    while ".." in s:
        s = s.replace("..", ".")
    return _fit_bytes(s) or "image"


def _fit_bytes(stem: str) -> str:
    """`stem` cut to MAX_STEM_BYTES of UTF-8, ending in a hash of the whole when cut."""
    data = stem.encode("utf-8")
    if len(data) <= MAX_STEM_BYTES:
        return stem
    digest = hashlib.sha256(data).hexdigest()[:8]
    head = data[: MAX_STEM_BYTES - len(digest) - 1].decode("utf-8", errors="ignore")
    return f"{head}_{digest}"


def strip_footnotes(name: str) -> str:
    """`Denmark[i]` -> `Denmark`: drop Wikipedia footnote markers from a display name."""
    return _FOOTNOTE.sub("", name).strip() or name


def unique_stems(names: Iterable[str]) -> list[str]:
    """`safe_stem` of each name, with `_2`, `_3`… added to repeats (case-insensitively)."""
    seen: set[str] = set()
    out = []
    for n in names:
        base = safe_stem(n)
        stem, i = base, 2
        while stem.casefold() in seen:
            stem, i = f"{base}_{i}", i + 1
        seen.add(stem.casefold())
        out.append(stem)
    return out


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    width: int | None
    height: int | None
    format: str | None


def probe_image(data: bytes) -> ImageInfo:
    """Hash and read the header of an image (no full decode); width/format None if unreadable."""
    import io

    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:  # (Pillow's bomb warning: ignored, see above)
            return ImageInfo(digest, im.width, im.height, im.format)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return ImageInfo(digest, None, None, None)


def _row(image_id: str, name: str, path: Location, source_url: str | None) -> dict:
    info = probe_image(path.read_bytes())
    return {
        "image_id": image_id,
        "name": name,
        "path": str(path),
        "source_url": source_url,
        "sha256": info.sha256,
        "width": info.width,
        "height": info.height,
        "format": info.format,
    }


def table_from_rows(rows: list[dict]) -> pa.Table:
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"duplicate image_id(s) in images table: {', '.join(dup)}")
    return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)


def from_folder(folder: str | os.PathLike) -> pa.Table:
    """One row per image file under `folder` (recursive).

    image_id is the relative path without its extension (`sub/Chad`), or with it when two files
    differ only by extension (`a.png`, `a.jpg`).
    """
    from flagsim.storage import walk_files

    root = Location.parse(folder)
    problem = file_problem(root)
    if problem == "file not found":
        raise DataError(f"image folder not found: {root}")
    if problem != "is a directory":
        raise DataError(f"image folder {root} is not a directory")
    if root.is_local:
        rels = _local_image_files(root.path)
        files = [root / rel for rel in rels]
    else:  # object stores: no symlinks, no special files
        files = [f for f in walk_files(root) if f.name.lower().endswith(IMAGE_SUFFIXES)]
        rels = [f.path[len(root.path) :].lstrip("/") for f in files]
    stems = [r.rsplit(".", 1)[0] for r in rels]
    clash = {s for s, n in Counter(stems).items() if n > 1}  # a.png + a.jpg: keep the extension
    rows = []
    for f, rel, stem in zip(files, rels, stems, strict=True):
        image_id = rel if stem in clash else stem
        name = f.name.rsplit(".", 1)[0].replace("_", " ")
        rows.append(_row(image_id, name, f, None))
    if not rows:
        raise DataError(
            f"no image files (.png, .jpg, .webp, .avif, ... any format Pillow opens) under {root}"
        )
    return table_from_rows(rows)


def _local_image_files(root: str) -> list[str]:
    """Relative paths of the regular image files under `root`, sorted; symlinks followed.

    Each directory is entered once (by st_dev/st_ino), so symlink loops end; a file reached
    by several paths (symlinks, hard links) is listed once, preferably by a path without
    symlinks: real folders are walked before any symlinked one.
    """
    seen_dirs: set[tuple[int, int]] = set()
    found: dict[tuple[int, int], tuple[bool, str]] = {}  # file -> (via a symlink, path)
    paths = revisits = 0
    not_utf8: list[str] = []
    broken: list[str] = []
    real: list[tuple[str, bool]] = [("", False)]
    linked: list[tuple[str, bool]] = []
    while real or linked:
        rel, via_link = real.pop() if real else linked.pop()
        path = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen_dirs:
                revisits += 1
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                entries = sorted(((e.name, e.is_symlink()) for e in it), reverse=True)
        except OSError as exc:
            log.warning("skipping folder %s: %s", path, exc)
            continue
        for name, is_link in entries:
            child = f"{rel}/{name}" if rel else name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes: no table or filesystem API takes it
                not_utf8.append(child)
                continue
            try:
                cst = os.stat(os.path.join(root, child))  # follows symlinks
            except OSError:
                if is_link:
                    broken.append(child)
                continue  # a broken symlink, or gone meanwhile
            if stat.S_ISDIR(cst.st_mode):
                (linked if via_link or is_link else real).append((child, via_link or is_link))
            elif stat.S_ISREG(cst.st_mode) and name.lower().endswith(IMAGE_SUFFIXES):
                paths += 1
                key, pick = (cst.st_dev, cst.st_ino), (via_link or is_link, child)
                found[key] = min(found.get(key, pick), pick)
    for what, names in (("names that are not UTF-8 text (rename them)", not_utf8),
                        ("symlinks to nothing", broken)):
        if names:
            log.warning("%s: skipped %d %s, e.g. %s", root, len(names), what, ascii(names[0]))
    if revisits or paths > len(found):
        log.info(
            "%s: %d folder(s) reached again through symlinks and %d duplicate path(s) skipped",
            root, revisits, paths - len(found),
        )
    return sorted(rel for _, rel in found.values())


def from_csv(csv_path: str | os.PathLike, image_dir: str | os.PathLike) -> pa.Table:
    """Rows of a `Country,Flag Image[,...]` CSV whose files are `<safe_stem(Country)>.png`.

    Rows whose file is missing are logged and left out (see `missing_from_csv`).
    """
    table, _ = from_csv_with_missing(csv_path, image_dir)
    return table


def from_csv_with_missing(
    csv_path: str | os.PathLike, image_dir: str | os.PathLike
) -> tuple[pa.Table, list[dict]]:
    src = Location.parse(csv_path)
    folder = Location.parse(image_dir)
    if file_problem(folder) != "is a directory":
        raise DataError(f"image directory {folder} not found (--image-dir / images.image_dir)")
    rows, missing = [], []
    listed = 0
    with open_csv(src, "CSV") as reader:
        fields = reader.fieldnames
        if "Country" not in fields:
            raise DataError(
                f"{src} has no 'Country' column (columns: {', '.join(fields) or 'none'})"
            )
        for rec in reader:
            name = (rec.get("Country") or "").strip()
            if not name:
                continue
            listed += 1
            stem = safe_stem(name)  # the seed's file naming keeps footnote letters: Denmark[i] -> Denmarki
            name = strip_footnotes(name)
            f = folder / f"{stem}.png"
            problem = file_problem(f)  # stat first: a FIFO or device is never opened
            if problem is not None:
                missing.append(
                    {"image_id": stem, "name": name, "path": str(f), "stage": "images",
                     "model": None, "reason": problem}
                )
                continue
            rows.append(_row(stem, name, f, rec.get("Flag Image") or None))
    if missing:
        log.warning("%d CSV row(s) have no readable image file in %s", len(missing), folder)
    if not listed:
        raise DataError(f"{src} names no image (no row with a Country under its header)")
    if not rows:
        raise DataError(f"none of the images named in {src} were found in {folder}")
    return table_from_rows(rows), missing


def bundled_table() -> pa.Table:
    """The bundled flags: the sovereign states then the de facto states, in the list's order."""
    d = bundled_flags_dir()
    main = from_csv(d / "national_flags.csv", d / "images")
    de_facto = from_csv(d / "national_flags_de_facto.csv", d / "images")
    return pa.concat_tables([main, de_facto])


def bundled_table_in(run: RunDir) -> pa.Table:
    """The bundled flags copied into the run's `images/` (a file already there with the same
    bytes is kept), the table's paths pointing at the copies. The run owns its images: the
    package's own folder may be a temporary one (a Ray job's unpacked working dir, removed with
    its session), and a run that points into it loses its images when it goes."""
    table = bundled_table()
    copies = []
    for path in table.column("path").to_pylist():
        src = Path(path)
        dst = run.images_dir / src.name
        data = src.read_bytes()
        if not (dst.is_file() and dst.size() == len(data) and dst.read_bytes() == data):
            dst.write_bytes(data)
        copies.append(dst.uri)
    return table.set_column(table.schema.get_field_index("path"), "path",
                            pa.array(copies, pa.string()))


def write_images_table(table: pa.Table, run: RunDir, errors: list[dict] | None = None) -> Location:
    """Write `images.parquet` (and `errors/images.csv`-style rows) atomically into the run."""
    table = with_optional(table, IMAGES_SCHEMA, IMAGE_REF_COLUMNS)
    if run.images_table.exists() and not run.images_table.is_file():
        run.images_table.delete()  # a folder of parts written by a streamed source
    run.images_table.write_parquet(conform(table, IMAGES_SCHEMA))
    if errors is not None:
        err = run.errors_dir("images") / "part-00000.parquet"
        if errors:
            err.write_parquet(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
        elif err.exists():
            err.delete()
    log.info("wrote %s (%d images)", run.images_table, table.num_rows)
    return run.images_table


def images_table_location(location: str | os.PathLike | Location) -> Location:
    """Where the images table named by `location` is: the file or parts folder itself when its
    name ends in `.parquet` (or the file is Parquet under another name), else the run
    directory's `images.parquet`. DataError when there is none, saying how to make one (a CSV
    or URL list given here is named as such)."""
    loc = location if isinstance(location, Location) else Location.parse(location)
    if not loc.name.endswith(".parquet"):
        if loc.is_file():
            if is_parquet_file(loc):
                return loc
            lower = loc.name.lower()
            if lower.endswith((".csv", ".tsv", ".txt", ".csv.gz")):
                raise DataError(
                    f"{loc} is a CSV file, not an images table: make one with `flagsim images "
                    f"--from-csv {loc} --image-dir DIR --out RUN` (or --from-urls for URLs)")
            raise DataError(f"{loc} is not an images table (a Parquet file or a run directory)")
        loc = RunDir(loc).images_table
    if not loc.exists():
        raise DataError(f"images table not found: {loc} (run `flagsim images` or `flagsim scrape` first)")
    return loc


def read_images_table(location: str | os.PathLike | Location) -> pa.Table:
    """Read and validate an images table (a run directory, a .parquet file, or a folder of
    `part-NNNNN.parquet` parts, read in part order). Tables written before the reference columns
    existed read as plain files."""
    loc = images_table_location(location)
    if loc.is_file():
        table = loc.read_parquet()
    else:
        parts = [p for p in loc.list(".parquet") if shard_index(p.name) is not None]
        if not parts:
            raise DataError(f"images table {loc} is a folder without part-NNNNN.parquet files")
        tables = []
        for part in parts:
            t = with_optional(part.read_parquet(), IMAGES_SCHEMA, IMAGE_REF_COLUMNS)
            check_columns(t, IMAGES_SCHEMA, f"images table part {part}")
            tables.append(conform(t, IMAGES_SCHEMA))
        table = pa.concat_tables(tables)
    table = with_optional(table, IMAGES_SCHEMA, IMAGE_REF_COLUMNS)
    check_columns(table, IMAGES_SCHEMA, f"images table {loc}")
    table = conform(table, IMAGES_SCHEMA)
    ids = table.column("image_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise DataError(f"images table {loc} has duplicate image_id values")
    return table


def images_table_hash(table: pa.Table) -> str:
    """A hash of the images table's identity columns (ids, paths, content hashes, and the
    member/offset of rows whose bytes are in a container; plain-file rows hash as before)."""
    h = hashlib.sha256()
    n = table.num_rows
    members = table.column("member").to_pylist() if "member" in table.column_names else [None] * n
    offsets = table.column("offset").to_pylist() if "offset" in table.column_names else [None] * n
    for i, p, s, m, o in zip(
        table.column("image_id").to_pylist(),
        table.column("path").to_pylist(),
        table.column("sha256").to_pylist(),
        members, offsets,
        strict=True,
    ):
        ref = f"\t{m}\t{o}" if m is not None else ""
        h.update(f"{i}\t{p}\t{s}{ref}\n".encode())
    return h.hexdigest()[:16]
