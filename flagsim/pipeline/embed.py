"""`flagsim embed`: resolve the images, decide per model what to redo, run the stream, summarise."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from flagsim.config import Config, ModelRunConfig, check_writable
from flagsim.errors import DataError, WeightsUnavailableError
from flagsim.images import (
    bundled_table_in,
    from_csv,
    from_folder,
    read_images_table,
    write_images_table,
)
from flagsim.imagestable import ImagesTable
from flagsim.pipeline.plan import (
    actor_cpus,
    plan_shards,
    prepare_model,
    repair,
    reusable_manifest,
    run_key,
    settle_set_aside,
    torch_threads,
)
from flagsim.pipeline.runner import NothingEmbedded, run_models
from flagsim.pipeline.summary import (
    STREAM_NOTE,
    EmbedSummary,
    ModelResult,
    print_summary,
    summary_table,
)
from flagsim.rundir import RunDir, shard_name
from flagsim.shards import repair_run_id
from flagsim.storage import Location

__all__ = [
    "STREAM_NOTE", "EmbedSummary", "ModelResult", "print_summary", "repair", "resolve_images",
    "run_embed", "summary_table",
]

#: The names these had before planning moved to flagsim.pipeline.plan.
_actor_cpus, _torch_threads = actor_cpus, torch_threads

log = logging.getLogger(__name__)


# --- images ----------------------------------------------------------------------------------

def resolve_images(cfg: Config, run: RunDir, images: str | None) -> ImagesTable:
    """The images table of this run (a handle: rows are read where needed, never all at once
    in the driver): --images (copied into the run part by part), the run's own table, or built
    from cfg.images."""
    if images:
        source = ImagesTable(images)
        if source.location.uri != run.images_table.uri:
            # checked before it replaces the run's table (which a bad one must not destroy)
            if source.num_rows == 0:
                raise DataError(f"the images table {images} has no rows: nothing to embed")
            source.scan(cfg.embed.shard_size)  # ids unique, values readable
            copy_images_table(source, run)
        return ImagesTable(run.images_table)
    if run.images_table.exists():
        return ImagesTable(run.images_table)
    src = cfg.images
    if src.source == "bundled":
        table = bundled_table_in(run)
    elif src.source == "folder":
        table = from_folder(_need(src.path, "images.path"))
    elif src.source == "csv":
        table = from_csv(_need(src.path, "images.path"), _need(src.image_dir, "images.image_dir"))
    elif src.source in STREAMED_SOURCES:
        build_from_source(cfg, run)
        return ImagesTable(run.images_table)
    else:
        source = ImagesTable(_need(src.path, "images.path"))
        copy_images_table(source, run)
        return ImagesTable(run.images_table)
    write_images_table(table, run)
    return ImagesTable(run.images_table)


def copy_images_table(source: ImagesTable, run: RunDir) -> None:
    """Write `source` as the run's images table: one file when it has one part (streamed a
    batch of rows at a time), else the same parts (each read and written whole: memory holds
    one part)."""
    if len(source.parts) == 1:
        _stream_copy(Location.parse(source.parts[0].uri), run)
        return
    target = run.images_table
    tmp = run.staging / "images-copy"
    tmp.delete()
    for i, part in enumerate(source.parts):
        t = read_images_table(Location.parse(part.uri))
        (tmp / shard_name(i)).write_parquet(t, staging=run.staging)
    target.delete()
    for i in range(len(source.parts)):
        (target / shard_name(i)).write_bytes((tmp / shard_name(i)).read_bytes(), staging=run.staging)
    tmp.delete()

def _stream_copy(src: Location, run: RunDir, batch_rows: int = 65_536) -> None:
    """Copy a one-file images table into the run `batch_rows` rows at a time, each batch checked
    and conformed to IMAGES_SCHEMA (a million-row file never sits in memory whole); the file is
    staged and moved into place at the end. Duplicate ids are found by the embed's scan."""
    import os
    import tempfile
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flagsim.schema import (
        IMAGE_REF_COLUMNS,
        IMAGES_SCHEMA,
        check_columns,
        conform,
        with_optional,
    )

    if run.root.is_local:
        run.staging.mkdirs()
        tmp = os.path.join(run.staging.path, f"images-{uuid.uuid4().hex}.parquet")
    else:
        tmp = os.path.join(tempfile.mkdtemp(prefix="flagsim-images-"), "images.parquet")
    rows = 0
    try:
        with src.fs.open_input_file(src.path) as f, \
                pq.ParquetWriter(tmp, IMAGES_SCHEMA, compression="zstd") as writer:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                t = with_optional(pa.Table.from_batches([batch]), IMAGES_SCHEMA, IMAGE_REF_COLUMNS)
                check_columns(t, IMAGES_SCHEMA, f"images table {src}")
                writer.write_table(conform(t, IMAGES_SCHEMA))
                rows += t.num_rows
        if run.images_table.exists() and not run.images_table.is_file():
            run.images_table.delete()  # a folder of parts written by a streamed source
        run.images_table.put_file(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%d images)", run.images_table, rows)


#: Sources whose builders write the run's images table themselves (streamed, in parts).
STREAMED_SOURCES = ("webdataset", "parquet", "urls")


def build_from_source(cfg: Config, run: RunDir) -> None:
    """Write the run's images table from a webdataset, Parquet or URL source of `cfg.images`."""
    from flagsim import sources

    src = cfg.images
    path = _need(src.path, "images.path")
    if src.source == "webdataset":
        sources.from_webdataset(path, run)
    elif src.source == "parquet":
        sources.from_parquet(path, _need(src.image_column, "images.image_column"), run,
                             id_column=src.id_column, name_column=src.name_column)
    else:
        sources.from_urls(path, run, download_options(src.download), url_column=src.url_column,
                          id_column=src.id_column, name_column=src.name_column)


def download_options(dl):
    """The scraper's options for `images.download` (a `DownloadConfig`)."""
    from flagsim.scrape import ScrapeOptions

    values = dl.model_dump()
    if values["user_agent"] is None:
        del values["user_agent"]
    values["allow_hosts"] = tuple(values["allow_hosts"])
    return ScrapeOptions(**values)


def _need(value: str | None, key: str) -> str:
    if not value:
        raise DataError(f"config key {key} is required for this images.source")
    return value


# --- the job ---------------------------------------------------------------------------------

def run_embed(
    cfg: Config,
    run_dir: str | None = None,
    images: str | None = None,
    models: Sequence[str] | None = None,
    force: bool = False,
    repair_shards: bool = False,
    show_progress: bool = True,
) -> EmbedSummary:
    """Embed every image of the run with every selected model; resumable and idempotent."""
    from flagsim.models import check_model_names
    from flagsim.runlock import run_lock

    run_dir = run_dir or cfg.run_dir
    check_writable(run_dir)
    names = list(models) if models else list(cfg.embed.models)
    check_model_names(names)
    run = RunDir.at(run_dir)
    with run_lock(run.root, "flagsim embed"):  # one writer per run: a second embed fails at once
        return _run_embed(cfg, run, images, names, force, repair_shards, show_progress)


def _run_embed(
    cfg: Config, run: RunDir, images: str | None, names: list[str], force: bool,
    repair_shards: bool, show_progress: bool,
) -> EmbedSummary:
    from flagsim.models import check_weights

    # weights first: `embed.strict` fails before the images table is written
    missing = {name: check_weights(name, cfg.embed.for_model(name).weights,
                                   cfg.embed.for_model(name).revision) for name in names}
    if cfg.embed.strict and (reason := next((r for r in missing.values() if r), None)):
        raise WeightsUnavailableError(reason)
    if repair_shards and (repaired := repair_run_id(run)):
        log.warning("repair: %s", repaired)
    table = resolve_images(cfg, run, images)
    if table.num_rows == 0:
        raise DataError(f"the images table of {run.root} has no rows: nothing to embed")
    if run.staging.remove_temp_files():
        log.info("removed temporary files of an interrupted write in %s", run.staging)
    scan = table.scan(cfg.embed.shard_size)  # one streamed pass: ids unique, hashes
    images_hash = scan.images_hash
    plans = plan_shards(table.num_rows, cfg.embed.shard_size)
    hashes = scan.shard_hashes
    summary = EmbedSummary(run_dir=run.root.uri, images=table.num_rows)
    log.info("%d images in %d shard(s) of up to %d", table.num_rows, len(plans), cfg.embed.shard_size)

    todo: dict[str, set[int]] = {}
    mcfgs: dict[str, ModelRunConfig] = {}
    for name in names:
        mcfg = cfg.embed.for_model(name)
        reason = missing[name]
        if reason:
            log.warning("skipping %s", reason)
            summary.results.append(ModelResult(name, "skipped", reason=reason))
            continue
        key = run_key(cfg, mcfg)
        manifest = reusable_manifest(run, name, key, images_hash, force=force,
                                     repair_shards=repair_shards, planned=set(hashes))
        if manifest is not None:
            settle_set_aside(run, name)  # a replace that finished before its copy was dropped
            summary.results.append(
                ModelResult(name, "up to date", images=manifest.rows, dim=manifest.dim,
                            device=manifest.device, dtype=manifest.dtype, errors=manifest.errors)
            )
            continue
        todo[name] = prepare_model(run, name, key, plans, hashes, force)
        mcfgs[name] = mcfg

    if todo:
        try:
            results, summary.decode_errors = run_models(
                cfg, run, table, plans, todo, mcfgs, images_hash, show_progress
            )
        except NothingEmbedded:
            for name in todo:  # what --force set aside comes back: nothing replaced it
                if restored := settle_set_aside(run, name):
                    log.warning(restored)
            raise
        for name in todo:
            settle_set_aside(run, name)
        summary.results.extend(results)
    if behind := models_behind(run, images_hash):
        one = len(behind) == 1
        log.warning("%s of this run %s embedded from an earlier images table than this one (%d "
                    "images): run `flagsim embed --models %s` to bring %s up to date; until "
                    "then %s neighbours, and the ensemble, cover only the images %s had",
                    ", ".join(behind), "was" if one else "were", table.num_rows,
                    ",".join(behind), "it" if one else "them", "its" if one else "their",
                    "it" if one else "they")
    _record(run, summary)
    return summary


def models_behind(run: RunDir, images_hash: str) -> list[str]:
    """Complete models `flagsim embed` made from another images table than the run's (hash
    `images_hash`): `embed --images NEW --models a` replaces the table other models were
    embedded from, and searches then mix two collections. Imported models are not compared."""
    from flagsim.shards import read_manifest

    behind = []
    for m in run.embedded_models():  # those without a manifest (incomplete) are not compared
        man = read_manifest(run, m)
        if man is not None and man.source == "flagsim embed" and man.images_hash != images_hash:
            behind.append(m)
    return behind


def _record(run: RunDir, summary: EmbedSummary) -> None:
    """`_meta/embed.json`: each model's status and reason in the last embed (the report's header)."""
    import time

    (run.meta / "embed.json").write_json({
        "images": summary.images, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [{"model": r.model, "status": r.status, "reason": r.reason} for r in summary.results],
    })
