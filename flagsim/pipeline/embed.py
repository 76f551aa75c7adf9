"""`flagsim embed`: plan shards, skip what is done, stream images through every model, summarise."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from flagsim.config import Config, ModelRunConfig, check_writable, gpus_per_actor
from flagsim.errors import DataError, WeightsUnavailableError
from flagsim.images import (
    bundled_table,
    from_csv,
    from_folder,
    images_table_hash,
    read_images_table,
    write_images_table,
)
from flagsim.pipeline.reader import ShardPlan, build_dataset, plan_shards
from flagsim.pipeline.writer import ShardWriter
from flagsim.rundir import RunDir, shard_index, shard_name
from flagsim.schema import META_DIM
from flagsim.shards import (
    Manifest,
    done_shards,
    read_manifest,
    shard_files,
    shard_problem,
    vectors_of,
    write_manifest,
)
from flagsim.storage import Location

log = logging.getLogger(__name__)


@dataclass
class ModelResult:
    """One row of the end-of-run summary."""

    model: str
    status: str  # embedded | up to date | skipped | failed
    images: int = 0
    dim: int | None = None
    device: str = ""
    dtype: str = ""
    seconds: float | None = None
    images_per_s: float | None = None
    errors: int = 0
    reason: str = ""


@dataclass
class EmbedSummary:
    run_dir: str
    images: int
    results: list[ModelResult] = field(default_factory=list)
    decode_errors: int = 0

    def result(self, model: str) -> ModelResult:
        return next(r for r in self.results if r.model == model)


# --- images ----------------------------------------------------------------------------------

def resolve_images(cfg: Config, run: RunDir, images: str | None) -> pa.Table:
    """The images table for this run: --images, the run's own table, or built from cfg.images."""
    if images:
        table = read_images_table(images)
        if Location.parse(images).uri != run.images_table.uri:
            write_images_table(table, run)
        return table
    if run.images_table.exists():
        return read_images_table(run.images_table)
    src = cfg.images
    if src.source == "bundled":
        table = bundled_table()
    elif src.source == "folder":
        table = from_folder(_need(src.path, "images.path"))
    elif src.source == "csv":
        table = from_csv(_need(src.path, "images.path"), _need(src.image_dir, "images.image_dir"))
    else:
        table = read_images_table(_need(src.path, "images.path"))
    write_images_table(table, run)
    return table


def _need(value: str | None, key: str) -> str:
    if not value:
        raise DataError(f"config key {key} is required for this images.source")
    return value


# --- planning --------------------------------------------------------------------------------

def _run_key(cfg: Config, mcfg: ModelRunConfig, tiny: bool) -> dict:
    """What every shard of a model depends on besides its own rows."""
    return {
        "shard_size": cfg.embed.shard_size,
        "weights": "tiny" if tiny else mcfg.weights,
        "revision": mcfg.revision,
    }


def shard_hashes(table: pa.Table, plans: list[ShardPlan]) -> dict[str, str]:
    """Per shard file, a hash of its rows' ids, paths and content hashes."""
    return {shard_name(p.index): images_table_hash(table.slice(p.start, p.rows)) for p in plans}


def _read_run_marker(run: RunDir, model: str) -> dict | None:
    """The model's resume key file, or None when absent; DataError when it is not one."""
    marker = run.run_marker(model)
    if not marker.exists():
        return None
    data = marker.read_json()
    if not isinstance(data, dict) or not isinstance(data.get("shards", {}), dict):
        raise DataError(f"{marker} is not a valid run marker; rerun with --force to start {model} afresh")
    return data


def _prepare_model_dir(
    run: RunDir, model: str, key: dict, shards: dict[str, str], force: bool
) -> None:
    """Discard what cannot be reused: everything when forced or made with other settings,
    else only the shards whose rows changed in the images table (a fixed or added image
    re-embeds its own shard, not the whole run)."""
    mdir = run.model_dir(model)
    old = None if force else _read_run_marker(run, model)
    wipe = force or (old is not None and old.get("key") != key)
    wipe = wipe or (old is None and bool(shard_files(run, model)))  # shards of unknown origin
    if wipe:
        log.info("%s: discarding previous shards (%s)", model, "--force" if force else "settings changed")
        _discard(run, model)
    elif old is not None:
        before = old.get("shards", {})
        done = done_shards(run, model, verify=not run.manifest(model).exists())
        stale = [loc for idx, loc in shard_files(run, model).items()
                 if idx not in done or shards.get(loc.name) is None
                 or before.get(loc.name) != shards[loc.name]]
        for loc in stale:
            why = "not complete" if shard_index(loc.name) not in done else "out of date with the images table"
            log.info("%s: %s is %s; redoing it", model, loc.name, why)
            loc.delete()
        if stale and run.manifest(model).exists():
            run.manifest(model).delete()
    _remove_shard_dirs(run, model)
    mdir.mkdirs()
    run.run_marker(model).write_json({"key": key, "shards": shards})


def _remove_shard_dirs(run: RunDir, model: str) -> list[str]:
    """Delete directories where shard files belong (a shard could never be written there)."""
    removed = []
    for d in run.model_dir(model).dirs():
        if shard_index(d.name) is not None:
            log.warning("%s: removing %s (a directory where a shard belongs)", model, d)
            d.delete()
            removed.append(d.name)
    return removed


def _discard(run: RunDir, model: str) -> None:
    """Delete a model's shards and sidecars (the manifest first: the model is then incomplete)."""
    for loc in (run.manifest(model), run.legacy_manifest(model), run.model_dir(model), run.meta_dir(model)):
        loc.delete()


def repair(run: RunDir, model: str, planned: set[str] | None = None) -> list[str]:
    """Delete every shard of `model` that a read would refuse, and its manifest; return names.

    Refused (and so removed): unreadable or truncated files, another model's or another run's
    shards, a wrong dimension or row count, a checksum that differs from the one recorded when
    the shard was written, shards without a completion marker, and shards outside the plan
    (`planned`). The embed that follows redoes exactly those.
    """
    removed: list[str] = _remove_shard_dirs(run, model)
    manifest_loc = run.manifest(model)
    manifest = None
    try:
        manifest = read_manifest(run, model)
    except DataError:
        manifest_loc.delete()
        removed.append(manifest_loc.name)
    for idx, loc in sorted(shard_files(run, model).items()):
        reason, _ = shard_problem(run, model, loc, manifest)
        if reason is None and planned is not None and loc.name not in planned:
            reason = "is not part of this run's shard plan"
        if reason is None and manifest is not None and loc.name not in manifest.shards:
            reason = "is not listed in the manifest"
        if reason is None and idx not in done_shards(run, model, verify=True):
            reason = "has no completion marker matching its bytes"
        if reason:
            log.warning("repair: removing %s (it %s)", loc, reason)
            loc.delete()
            run.shard_marker(model, idx).delete()
            removed.append(loc.name)
    if removed and manifest_loc.exists():
        manifest_loc.delete()
    elif manifest is not None and set(manifest.shards) - {loc.name for loc in shard_files(run, model).values()}:
        manifest_loc.delete()
        removed.append(manifest_loc.name)
    return removed


# --- resources -------------------------------------------------------------------------------

def _device(cfg: Config, resources: dict[str, float]) -> str:
    if cfg.embed.device != "auto":
        return cfg.embed.device
    return "cuda" if resources.get("GPU", 0) > 0 else "cpu"


def _dtype(cfg: Config, mcfg: ModelRunConfig, device: str) -> str:
    dtype = mcfg.dtype if mcfg.dtype != "auto" else cfg.embed.dtype
    if dtype == "auto":
        return "float16" if device == "cuda" else "float32"
    return dtype


#: Logical CPUs of an actor of a `light` model (ModelSpec.light: the pixels baseline).
LIGHT_ACTOR_CPUS = 0.25


def _actor_cpus(cfg: Config, mcfgs: dict[str, ModelRunConfig], total_cpus: float) -> dict[str, float]:
    """Logical CPUs per actor: what the config says, else share what reading leaves free.

    Reading and decoding always keep `ray.read_cpus`; without that, on a small machine actors that
    claim every CPU starve the read tasks and the job hangs. Next to a network, light models
    (negligible compute) get `LIGHT_ACTOR_CPUS` and the networks share the rest.
    """
    from flagsim.models import get_spec

    free = max(total_cpus - cfg.ray.read_cpus, 0.1)
    networks = any(not get_spec(m).light for m in mcfgs)
    light = {m for m, c in mcfgs.items() if networks and c.num_cpus is None and get_spec(m).light}
    unset = [m for m, c in mcfgs.items() if c.num_cpus is None and m not in light]
    claimed = sum(c.num_cpus * c.num_actors for c in mcfgs.values() if c.num_cpus is not None)
    # a light actor takes a sliver, never more than an even split of what is free
    n_actors = sum(mcfgs[m].num_actors for m in light) + sum(mcfgs[m].num_actors for m in unset)
    light_cpus = min(LIGHT_ACTOR_CPUS, max(free - claimed, 0.1) / max(n_actors, 1))
    claimed += sum(light_cpus * mcfgs[m].num_actors for m in light)
    share = max(free - claimed, 0.1) / max(sum(mcfgs[m].num_actors for m in unset), 1)
    out = {}
    for m, c in mcfgs.items():
        if c.num_cpus is not None:
            out[m] = c.num_cpus
        elif m in light:
            out[m] = light_cpus
        else:
            out[m] = max(min(share, 8.0), 0.05)
    need = sum(out[m] * mcfgs[m].num_actors for m in mcfgs) + min(cfg.ray.read_cpus, 1.0)
    if need > total_cpus + 1e-6:
        raise DataError(
            f"actor pools need {need:g} CPUs (plus reading) but the Ray cluster has {total_cpus:g}; "
            "lower embed.settings.<model>.num_cpus or num_actors"
        )
    return out


def _torch_threads(name: str, cpus: float, todo: dict[str, set[int]], device: str,
                   resources: dict[str, float]) -> int:
    """Intra-op threads of `name`'s actors when the config does not set `torch_threads`.

    On CPU a lone model (light models aside) uses every core: decoding needs a fraction of one,
    and a model held to its logical CPUs ran at 0.57 of a bare forward (docs/benchmarks.md).
    Next to a network, light models get one thread; several networks get their logical CPUs each.
    Light models alone are treated like networks.
    """
    from flagsim.models import get_spec

    live = [m for m in todo if todo[m]]
    heavy = [m for m in live if not get_spec(m).light]
    if heavy and get_spec(name).light:
        return 1
    if device == "cpu" and len(heavy or live) == 1:
        return max(1, int(resources["CPU"]))
    return max(1, math.floor(cpus))


# --- the job ---------------------------------------------------------------------------------

def run_embed(
    cfg: Config,
    run_dir: str | None = None,
    images: str | None = None,
    models: Sequence[str] | None = None,
    force: bool = False,
    repair_shards: bool = False,
    tiny: bool = False,
    show_progress: bool = True,
) -> EmbedSummary:
    """Embed every image of the run with every selected model; resumable and idempotent.

    `tiny=True` uses tiny random-weight models of each family (tests and smoke runs only).
    """
    from flagsim.models import check_model_names
    from flagsim.runlock import run_lock

    run_dir = run_dir or cfg.run_dir
    check_writable(run_dir)
    names = list(models) if models else list(cfg.embed.models)
    check_model_names(names)
    run = RunDir.at(run_dir)
    with run_lock(run.root, "flagsim embed"):  # one writer per run: a second embed fails at once
        return _run_embed(cfg, run, images, names, force, repair_shards, tiny, show_progress)


def _run_embed(
    cfg: Config, run: RunDir, images: str | None, names: list[str], force: bool,
    repair_shards: bool, tiny: bool, show_progress: bool,
) -> EmbedSummary:
    from flagsim.models import check_weights

    table = resolve_images(cfg, run, images)
    if table.num_rows == 0:
        raise DataError(f"the images table of {run.root} has no rows: nothing to embed")
    if run.staging.remove_temp_files():
        log.info("removed temporary files of an interrupted write in %s", run.staging)
    images_hash = images_table_hash(table)
    plans = plan_shards(table.num_rows, cfg.embed.shard_size)
    hashes = shard_hashes(table, plans)
    summary = EmbedSummary(run_dir=run.root.uri, images=table.num_rows)
    log.info("%d images in %d shard(s) of up to %d", table.num_rows, len(plans), cfg.embed.shard_size)

    todo: dict[str, set[int]] = {}
    mcfgs: dict[str, ModelRunConfig] = {}
    for name in names:
        mcfg = cfg.embed.for_model(name)
        if not tiny:
            reason = check_weights(name, mcfg.weights, mcfg.revision)
            if reason:
                if cfg.embed.strict:
                    raise WeightsUnavailableError(reason)
                log.warning("skipping %s", reason)
                summary.results.append(ModelResult(name, "skipped", reason=reason))
                continue
        key = _run_key(cfg, mcfg, tiny)
        if run.legacy_manifest(name).exists() and not force:
            raise DataError(
                f"{run.model_dir(name)} was written by an older flagsim (layout 1); "
                f"re-embed it with `flagsim embed --force --models {name}`"
            )
        if repair_shards:
            removed = repair(run, name, planned=set(hashes))
            if removed:
                log.info("%s: repair removed %s", name, ", ".join(removed))
        manifest = read_manifest(run, name) if not force else None
        if repair_shards and manifest is not None and _refused(run, name, manifest):
            manifest = None
        if manifest is not None and manifest.images_hash == images_hash and _marker_matches(run, name, key):
            summary.results.append(
                ModelResult(name, "up to date", images=manifest.rows, dim=manifest.dim,
                            device=manifest.device, dtype=manifest.dtype, errors=manifest.errors)
            )
            continue
        _prepare_model_dir(run, name, key, hashes, force)
        have = set(done_shards(run, name))
        missing = {p.index for p in plans} - have
        todo[name] = missing
        mcfgs[name] = mcfg

    if todo:
        _embed(cfg, run, table, plans, todo, mcfgs, images_hash, summary, tiny, show_progress)
    return summary


def _refused(run: RunDir, model: str, manifest: Manifest) -> bool:
    """True when a read of the model's shards would refuse them (after repair: a shard is gone)."""
    return set(manifest.shards) != {loc.name for loc in shard_files(run, model).values()}


def _marker_matches(run: RunDir, model: str, key: dict) -> bool:
    marker = _read_run_marker(run, model)
    return marker is None or marker.get("key") == key


def _embed(
    cfg: Config,
    run: RunDir,
    table: pa.Table,
    plans: list[ShardPlan],
    todo: dict[str, set[int]],
    mcfgs: dict[str, ModelRunConfig],
    images_hash: str,
    summary: EmbedSummary,
    tiny: bool,
    show_progress: bool,
) -> None:
    import ray

    from flagsim.pipeline.mapper import EmbedActor
    from flagsim.pipeline.ray_session import ensure_ray, quiet_ray_data

    resources = ensure_ray(cfg)
    quiet_ray_data()
    device = _device(cfg, resources)
    cpus = _actor_cpus(cfg, {m: c for m, c in mcfgs.items() if todo[m]}, resources["CPU"])
    needed = sorted(set().union(*todo.values()))
    work = [p for p in plans if p.index in needed]
    n_rows = sum(p.rows for p in work)
    ds = build_dataset(
        table, work, decode_batch_size=cfg.embed.decode_batch_size,
        max_pixels=cfg.embed.max_image_pixels, decode_cpus=min(cfg.ray.read_cpus, 1.0),
    )
    dtypes = {}
    for name, mcfg in mcfgs.items():
        if not todo[name]:
            continue
        dtypes[name] = _dtype(cfg, mcfg, device)
        from flagsim.models import get_spec

        batch_size = mcfg.batch_size or get_spec(name).default_batch_size
        threads = mcfg.torch_threads or _torch_threads(name, cpus[name], todo, device, resources)
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_args=(name,),
            fn_constructor_kwargs={
                "weights": mcfg.weights, "revision": mcfg.revision, "device": device,
                "preprocess_device": "cpu" if mcfg.preprocess_on == "cpu" else device,
                "dtype": dtypes[name], "torch_threads": threads, "tiny": tiny,
                "micro_batch": batch_size, "describe_to": _described(run, name).uri,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                min_size=mcfg.num_actors, max_size=mcfg.max_actors or mcfg.num_actors
            ),
            num_cpus=cpus[name],
            num_gpus=gpus_per_actor(mcfg, device),
        )
    ds = ds.drop_columns(["pixels"])
    live = {m: s for m, s in todo.items() if s}
    for m in todo:
        if not todo[m]:
            log.info("%s: all shards present, writing manifest", m)

    start = time.perf_counter()
    with _progress(show_progress, n_rows) as advance:
        writer = ShardWriter(run, table, work, live, on_shard=lambda _s, rows: advance(rows))
        if live:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                writer.add(batch)
    seconds = time.perf_counter() - start
    if writer.incomplete:
        raise DataError(f"pipeline ended with incomplete shard(s) {writer.incomplete[:5]}; rerun to resume")

    errors = _count_errors(run)
    for name in todo:
        shards = {loc.name: loc.parquet_num_rows() for loc in done_shards(run, name).values()}
        expected = {shard_name(p.index) for p in plans}
        if set(shards) != expected:
            missing = sorted(expected - set(shards))
            raise DataError(f"{name}: shard(s) {', '.join(missing[:3])} missing after the run; rerun")
        rows = sum(shards.values())
        dim = _dim(run, name)
        processed = sum(p.rows for p in plans if p.index in todo[name])
        described = _described(run, name)
        info = described.read_json() if described.exists() else {}
        manifest = Manifest(
            model=name, dim=dim, rows=rows, images_hash=images_hash, shards=shards,
            checkpoint=info.get("checkpoint") or _checkpoint(name, mcfgs[name]),
            revision=info.get("revision") or mcfgs[name].revision,
            dtype=dtypes.get(name, _dtype(cfg, mcfgs[name], device)),
            device=device, processor=info.get("processor", {}),
            seconds=round(seconds, 3),
            images_per_s=round(processed / seconds, 3) if seconds > 0 and processed else None,
            errors=errors, shard_size=cfg.embed.shard_size,
        )
        write_manifest(run, manifest)
        summary.results.append(
            ModelResult(name, "embedded", images=rows, dim=dim, device=device,
                        dtype=manifest.dtype, seconds=manifest.seconds,
                        images_per_s=manifest.images_per_s, errors=errors)
        )
    summary.decode_errors = errors


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


class _progress:
    """A rich progress bar over images (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total

    def __enter__(self):
        if not self.enabled:
            return lambda _n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from flagsim.console import stderr_console

        self._p = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=stderr_console(), transient=False,
        )
        self._p.__enter__()
        task = self._p.add_task("embedding images", total=self.total)
        return lambda n: self._p.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)


#: Below the summary table: what its time columns measure.
STREAM_NOTE = (
    "stream s, stream images/s: the shared stream's wall time and rate (decode and every model "
    "together, one pass over the images), not one model's own"
)


def summary_table(summary: EmbedSummary):
    """A rich Table: model, status, images, dim, device, dtype, stream s, stream images/s,
    errors, note. Every cell is escaped (names and reasons are shown literally)."""
    from rich.table import Table

    from flagsim.console import safe

    t = Table(title=f"flagsim embed: {summary.images} images -> {safe(summary.run_dir)}")
    numeric = ("images", "dim", "stream s", "stream images/s", "errors")
    for col in ("model", "status", "images", "dim", "device", "dtype", "stream s", "stream images/s",
                "errors", "note"):
        t.add_column(col, justify="right" if col in numeric else "left")
    for r in summary.results:
        t.add_row(
            safe(r.model), r.status, str(r.images), str(r.dim or ""), safe(r.device), safe(r.dtype),
            f"{r.seconds:.1f}" if r.seconds is not None else "",
            f"{r.images_per_s:.1f}" if r.images_per_s is not None else "",
            str(r.errors), safe(_short(r.reason)),
        )
    return t


def _short(reason: str) -> str:
    if not reason:
        return ""
    return "weights unavailable (see below)" if "weights" in reason else reason[:40]


def print_summary(summary: EmbedSummary) -> None:
    """The summary table, a note on its time columns, then each skip reason in full on its own
    line (one line each however long: a pipe gets the full width)."""
    from flagsim.console import safe, stdout_console

    console = stdout_console()
    console.print(summary_table(summary))
    if any(r.seconds is not None for r in summary.results):
        console.print(STREAM_NOTE, markup=False, highlight=False)
    for r in summary.results:
        if r.reason:
            console.print(f"  {safe(r.model)} {r.status}: {safe(r.reason)}", soft_wrap=True,
                          highlight=False)
