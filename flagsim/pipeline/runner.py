"""Runner: compose reader, one actor pool per model and the writer on Ray Data; write manifests."""

from __future__ import annotations

import logging
import time

import pyarrow.parquet as pq

from flagsim.config import Config, ModelRunConfig
from flagsim.errors import DataError
from flagsim.imagestable import ImagesTable
from flagsim.pipeline.plan import ResourcePlan, ShardPlan, plan_resources, work_shards
from flagsim.pipeline.reader import PIXELS, build_dataset
from flagsim.pipeline.summary import ModelResult, progress
from flagsim.pipeline.writer import ShardWriter
from flagsim.rundir import RunDir, shard_name
from flagsim.schema import META_DIM
from flagsim.shards import Manifest, done_shards, vectors_of, write_manifest
from flagsim.storage import Location

log = logging.getLogger(__name__)


class NothingEmbedded(DataError):
    """A model got no row at all: every image failed (its previous embeddings, if `--force`
    set them aside, are put back)."""


def run_models(
    cfg: Config,
    run: RunDir,
    table: ImagesTable,
    plans: list[ShardPlan],
    todo: dict[str, set[int]],
    mcfgs: dict[str, ModelRunConfig],
    images_hash: str,
    show_progress: bool,
) -> tuple[list[ModelResult], int]:
    """Embed the shards in `todo` (model -> shard indices) in one stream, then write every
    model's manifest; returns one result per model and the number of undecodable images.

    `table` is the images table's handle: the driver sends shard descriptors, the read tasks
    read the rows. The stream: the reader decodes each image once (`build_dataset`), one actor pool per model
    adds its embedding column, and the driver hands the batches to the `ShardWriter`. A model
    with no shard left to embed gets only its manifest.
    """
    from flagsim.pipeline.ray_session import ensure_ray, quiet_ray_data

    resources = ensure_ray(cfg)
    quiet_ray_data()
    res = plan_resources(cfg, mcfgs, todo, resources)
    work = work_shards(plans, todo)
    ds = build_dataset(
        table, work, shard_size=cfg.embed.shard_size, decode_batch_size=cfg.embed.decode_batch_size,
        max_pixels=cfg.embed.max_image_pixels, decode_cpus=min(cfg.ray.read_cpus, 1.0),
        **decode_options(cfg, res, resources, todo),
    )
    ds = add_model_pools(ds, run, mcfgs, todo, res)
    ds = ds.drop_columns([PIXELS])
    live = {m: s for m, s in todo.items() if s}
    for m in todo:
        if not todo[m]:
            log.info("%s: all shards present, writing manifest", m)
    seconds = stream_to_writer(ds, run, table, work, live, show_progress)
    return write_manifests(cfg, run, plans, todo, mcfgs, res, images_hash, seconds)


def decode_options(cfg: Config, res: ResourcePlan, resources: dict[str, float],
                   todo: dict[str, set[int]]) -> dict:
    """The read stage's decoder settings (`embed.jpeg_decoder`); DataError when GPU decoding
    would find no GPU share left by the model actors."""
    if cfg.embed.jpeg_decoder != "torchvision":
        return {}
    device = "cuda" if res.device == "cuda" else "cpu"
    if device == "cuda":
        claimed = sum(res.gpus[m] * cfg.embed.for_model(m).num_actors for m in res.gpus if todo[m])
        if resources.get("GPU", 0) - claimed < cfg.embed.decode_gpus - 1e-9:
            raise DataError(
                f"embed.jpeg_decoder torchvision on cuda needs embed.decode_gpus "
                f"({cfg.embed.decode_gpus:g}) of a GPU beside the model actors' {claimed:g}; "
                f"set embed.defaults.num_gpus to {1 - cfg.embed.decode_gpus:g}"
            )
    return {"jpeg_decoder": "torchvision", "decode_device": device,
            "decode_gpus": cfg.embed.decode_gpus}


def add_model_pools(
    ds,
    run: RunDir,
    mcfgs: dict[str, ModelRunConfig],
    todo: dict[str, set[int]],
    res: ResourcePlan,
):
    """`ds` with one `EmbedActor` pool per model that has shards to embed, chained in order."""
    import ray

    from flagsim.models.options import EmbedOptions
    from flagsim.pipeline.mapper import EmbedActor

    device, dtypes = res.device, res.dtypes
    for name, mcfg in mcfgs.items():
        if not todo[name]:
            continue
        batch_size = res.batch_sizes[name]
        threads = res.threads[name]
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_args=(name,),
            fn_constructor_kwargs={
                "options": EmbedOptions(
                    weights=mcfg.weights, revision=mcfg.revision, device=device,
                    preprocess_device="cpu" if mcfg.preprocess_on == "cpu" else device,
                    dtype=dtypes[name], torch_threads=threads, micro_batch=batch_size,
                ),
                "describe_to": _described(run, name).uri,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                min_size=mcfg.num_actors, max_size=mcfg.max_actors or mcfg.num_actors
            ),
            num_cpus=res.cpus[name],
            num_gpus=res.gpus[name],
        )
    return ds


def stream_to_writer(
    ds, run: RunDir, table: ImagesTable | None, work: list[ShardPlan], live: dict[str, set[int]],
    show_progress: bool,
) -> float:
    """Iterate the stream, handing every batch to a `ShardWriter`; the stream's wall seconds.
    DataError when a shard never completed."""
    start = time.perf_counter()
    with progress(show_progress, sum(p.rows for p in work)) as advance:
        writer = ShardWriter(run, None, work, live, on_shard=lambda _s, rows: advance(rows))
        if live:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
    seconds = time.perf_counter() - start
    if writer.incomplete:
        raise DataError(f"pipeline ended with incomplete shard(s) {writer.incomplete[:5]}; rerun to resume")
    return seconds


def write_manifests(
    cfg: Config,
    run: RunDir,
    plans: list[ShardPlan],
    todo: dict[str, set[int]],
    mcfgs: dict[str, ModelRunConfig],
    res: ResourcePlan,
    images_hash: str,
    seconds: float,
) -> tuple[list[ModelResult], int]:
    """Write the manifest of every model in `todo` (last: it marks the model complete)."""
    errors = _count_errors(run)
    device = res.device
    results = []
    empty: list[str] = []
    for name in todo:
        shards = {loc.name: loc.parquet_num_rows() for loc in done_shards(run, name).values()}
        expected = {shard_name(p.index) for p in plans}
        if set(shards) != expected:
            missing = sorted(expected - set(shards))
            raise DataError(f"{name}: shard(s) {', '.join(missing[:3])} missing after the run; rerun")
        rows = sum(shards.values())
        if rows == 0:  # no manifest: an empty model must not read as "up to date" from now on
            empty.append(name)
            continue
        dim = _dim(run, name)
        processed = sum(p.rows for p in plans if p.index in todo[name])
        described = _described(run, name)
        info = described.read_json() if described.exists() else {}
        manifest = Manifest(
            model=name, dim=dim, rows=rows, images_hash=images_hash, shards=shards,
            checkpoint=info.get("checkpoint") or _checkpoint(name, mcfgs[name]),
            revision=info.get("revision") or mcfgs[name].revision,
            dtype=res.dtypes[name],
            device=device, processor=info.get("processor", {}),
            seconds=round(seconds, 3),
            images_per_s=round(processed / seconds, 3) if seconds > 0 and processed else None,
            errors=errors, shard_size=cfg.embed.shard_size,
        )
        write_manifest(run, manifest)
        results.append(
            ModelResult(name, "embedded", images=rows, dim=dim, device=device,
                        dtype=manifest.dtype, seconds=manifest.seconds,
                        images_per_s=manifest.images_per_s, errors=errors)
        )
    if empty:  # after the other models' manifests: only the empty ones get their old shards back
        raise NothingEmbedded(
            f"{', '.join(empty)}: none of the {sum(p.rows for p in plans)} images could be read "
            f"({errors} errors, reasons in {run.errors_dir('embed')}); nothing was embedded"
        )
    return results, errors


def _dim(run: RunDir, model: str) -> int:
    """The embedding dimension, from the first shard's metadata (or its first row)."""
    for loc in done_shards(run, model).values():
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        if META_DIM in meta:
            return int(meta[META_DIM])
        return int(vectors_of(loc.read_parquet(columns=["embedding"])).shape[1])
    raise DataError(f"{model}: no shard written; rerun to resume")


def _count_errors(run: RunDir) -> int:
    return sum(loc.parquet_num_rows() for loc in run.errors_dir("embed").list(".parquet"))


def _checkpoint(name: str, mcfg: ModelRunConfig) -> str | None:
    from flagsim.models import get_spec

    return mcfg.weights or get_spec(name).weights


def _described(run: RunDir, model: str) -> Location:
    """Where the first actor of `model` records what it loaded (Embedder.describe())."""
    return run.embedder_info(model)
