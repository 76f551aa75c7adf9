"""Planning of an embed, without Ray: shards, run keys, reuse and repair of shards, resources."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from flagsim.config import Config, ModelRunConfig, gpus_per_actor
from flagsim.errors import DataError
from flagsim.images import images_table_hash
from flagsim.rundir import RunDir, shard_index, shard_name
from flagsim.shards import (
    Manifest,
    discard_model,
    done_shards,
    missing_or_resized,
    read_manifest,
    read_marker,
    shard_files,
    shard_problem,
    write_manifest,
)
from flagsim.storage import Location, walk_files

log = logging.getLogger(__name__)


# --- shards ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardPlan:
    """Rows [start, stop) of the images table form shard `index`."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(num_rows: int, shard_size: int) -> list[ShardPlan]:
    return [
        ShardPlan(i, start, min(start + shard_size, num_rows))
        for i, start in enumerate(range(0, num_rows, shard_size))
    ]


def rows_hashes(table: pa.Table, plans: list[ShardPlan]) -> dict[str, str]:
    """Per shard file name, a hash of its rows in the images table (ids, paths, content hashes)."""
    return {shard_name(p.index): images_table_hash(table.slice(p.start, p.rows)) for p in plans}


def work_shards(plans: list[ShardPlan], todo: dict[str, set[int]]) -> list[ShardPlan]:
    """The planned shards that at least one model still has to embed, in order."""
    needed = set().union(*todo.values()) if todo else set()
    return [p for p in plans if p.index in needed]


# --- reuse of a model's shards ---------------------------------------------------------------

def run_key(cfg: Config, mcfg: ModelRunConfig) -> dict:
    """What every shard of a model depends on besides its own rows."""
    return {
        "shard_size": cfg.embed.shard_size,
        "weights": mcfg.weights,
        "revision": mcfg.revision,
    }


def read_run_marker(run: RunDir, model: str) -> dict | None:
    """The model's resume key file, or None when absent; DataError when it is not one."""
    marker = run.run_marker(model)
    if not marker.exists():
        return None
    data = marker.read_json()
    if not isinstance(data, dict) or not isinstance(data.get("shards", {}), dict):
        raise DataError(f"{marker} is not a valid run marker; rerun with --force to start {model} afresh")
    return data


def reusable_manifest(
    run: RunDir, model: str, key: dict, images_hash: str, *, force: bool, repair_shards: bool,
    planned: set[str],
) -> Manifest | None:
    """The model's manifest when its embeddings are complete and current (nothing to do), else
    None. With `repair_shards`, shards a read would refuse are removed first (`repair`)."""
    if run.legacy_manifest(model).exists() and not force:
        raise DataError(
            f"{run.model_dir(model)} was written by an older flagsim (layout 1); "
            f"re-embed it with `flagsim embed --force --models {model}`"
        )
    if repair_shards:
        removed = repair(run, model, planned=planned)
        if removed:
            log.info("%s: repair removed %s", model, ", ".join(removed))
    manifest = read_manifest(run, model) if not force else None
    if repair_shards and manifest is not None and _refused(run, model, manifest):
        manifest = None
    if manifest is not None and manifest.images_hash == images_hash and _marker_matches(run, model, key):
        changed = missing_or_resized(run, manifest)
        if not changed:
            return manifest
        log.warning("%s: %s gone or changed on disk since it was written; embedding %s again",
                    model, ", ".join(changed[:3]) + (" …" if len(changed) > 3 else ""),
                    "it" if len(changed) == 1 else "them")
    return None


def _refused(run: RunDir, model: str, manifest: Manifest) -> bool:
    """True when a read of the model's shards would refuse them (after repair: a shard is gone)."""
    return set(manifest.shards) != {loc.name for loc in shard_files(run, model).values()}


def _marker_matches(run: RunDir, model: str, key: dict) -> bool:
    marker = read_run_marker(run, model)
    return marker is None or marker.get("key") == key


def prepare_model(
    run: RunDir, model: str, key: dict, plans: list[ShardPlan], shards: dict[str, str], force: bool
) -> set[int]:
    """Make the model's folder ready to resume; return the indices of the shards still to embed."""
    prepare_model_dir(run, model, key, shards, force)
    return {p.index for p in plans} - set(done_shards(run, model))


def prepare_model_dir(
    run: RunDir, model: str, key: dict, shards: dict[str, str], force: bool
) -> None:
    """Discard what cannot be reused: everything when forced or made with other settings,
    else only the shards whose rows changed in the images table (a fixed or added image
    re-embeds its own shard, not the whole run)."""
    mdir = run.model_dir(model)
    old = None if force else read_run_marker(run, model)
    if old is not None and old.get("key") != key and shard_files(run, model):
        # finished work is replaced only when asked: a changed shard size or weights re-embeds
        # every image of the model
        was = old.get("key") if isinstance(old.get("key"), dict) else {}
        diff = ", ".join(f"{k} {was.get(k)!r} -> {v!r}" for k, v in key.items() if was.get(k) != v)
        raise DataError(f"{model}: the embeddings in {mdir} were made with other settings "
                        f"({diff or 'unknown'}); rerun with --force to replace them, or with the "
                        "settings they were made with")
    wipe = force or (old is not None and old.get("key") != key)
    wipe = wipe or (old is None and bool(shard_files(run, model)))  # shards of unknown origin
    if wipe:
        log.info("%s: replacing previous shards (%s)", model, "--force" if force else "settings changed")
        set_aside(run, model)
    elif old is not None:
        before = old.get("shards", {})
        done = done_shards(run, model, verify=not run.manifest(model).exists())
        stale = [loc for idx, loc in shard_files(run, model).items()
                 if idx not in done or shards.get(loc.name) is None
                 or before.get(loc.name) != shards[loc.name]]
        whys: dict[str, list[str]] = {}
        for loc in stale:
            why = "not complete" if shard_index(loc.name) not in done else "out of date with the images table"
            whys.setdefault(why, []).append(loc.name)
            log.debug("%s: %s is %s; redoing it", model, loc.name, why)
        if stale:
            set_aside(run, model, [loc.name for loc in stale])
        for why, names in whys.items():  # a line per reason, not per shard (60 lines for 30)
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            log.info("%s: redoing %d shard(s) %s: %s", model, len(names), why, shown)
        if stale and run.manifest(model).exists():
            run.manifest(model).delete()
    _remove_shard_dirs(run, model)
    mdir.mkdirs()
    run.run_marker(model).write_json({"key": key, "shards": shards})


#: `RUN/_tmp/replaced-<model>/` (a run folder's layout): a model's last complete shards that an
#: embed replaces (all of them with `--force` or new settings; the shards whose images changed
#: otherwise), with the sidecars that describe them. Dropped once the model is complete again,
#: put back when nothing could be embedded (`settle_set_aside`); kept across an interrupt, so a
#: rerun resumes the new shards and drops it when they are complete.
SET_ASIDE_PREFIX = "replaced-"


def set_aside_dir(run: RunDir, model: str) -> RunDir:
    return RunDir(run.staging / f"{SET_ASIDE_PREFIX}{model}")


def _relative(run: RunDir, loc: Location) -> str:
    return loc.path[len(run.root.path):].lstrip("/")


def _copy(src: Location, dst: Location) -> None:
    if src.exists():
        dst.write_bytes(src.read_bytes())


def set_aside(run: RunDir, model: str, shards: Sequence[str] | None = None) -> None:
    """Clear the model's shard files `shards` (every shard and sidecar when None) for new
    embeddings, keeping the last complete ones in `set_aside_dir`.

    A complete model (a manifest): an older copy there is dropped, the sidecars (manifest, run
    marker, embedder) are copied there first, the run's manifest is deleted (the model is then
    incomplete), and last the shards and their markers move there. A model left incomplete by a
    set-aside a crash cut short: shards its copy's manifest lists and lacks move there, the rest
    are deleted. So a crash at any step leaves the copy completable, and a restore checks it.
    """
    keep = set_aside_dir(run, model)
    names = [loc.name for loc in shard_files(run, model).values()] if shards is None else list(shards)
    if run.manifest(model).exists():
        keep.root.delete()
        for loc in (run.run_marker(model), run.embedder_info(model), run.manifest(model)):
            _copy(loc, keep.root / _relative(run, loc))
        run.manifest(model).delete()
    kept = read_manifest(keep, model) if keep.manifest(model).exists() else None
    for name in names:
        shard, index = run.model_dir(model) / name, shard_index(name)
        marker = run.shard_marker(model, index) if index is not None else None
        wanted = kept is not None and name in kept.shards and not (keep.model_dir(model) / name).exists()
        for loc in (shard, marker):
            if loc is None or not loc.exists():
                continue
            if wanted:
                loc.move_to(keep.root / _relative(run, loc))
            else:
                loc.delete()
    if shards is None:
        discard_model(run, model)


def _restorable(run: RunDir, model: str, manifest: Manifest) -> str | None:
    """Why the run's shards are not the ones `manifest` lists (size, marker's sha256), or None."""
    changed = missing_or_resized(run, manifest)
    if changed:
        loc = run.model_dir(model) / changed[0]
        return f"{changed[0]} is {'not the shard it recorded' if loc.exists() else 'missing'}"
    for name in manifest.shards:
        index = shard_index(name)
        marker = read_marker(run, model, index) if index is not None else None
        if marker is None or (run.model_dir(model) / name).size() != marker.get("bytes") \
                or manifest.checksums.get(name, marker.get("sha256")) != marker.get("sha256"):
            return f"{name} is not the shard it recorded"
    return None


def settle_set_aside(run: RunDir, model: str) -> str | None:
    """After an embed: drop what `set_aside` kept when the model is complete again, else put it
    back: shards, markers and sidecars, then the manifest, only when every shard it lists is
    there as recorded (else the copy is dropped and the line says so). Shards the manifest does
    not list are deleted. Returns a line saying what happened, or None."""
    keep = set_aside_dir(run, model)
    if not keep.root.exists():
        return None
    manifest = read_manifest(keep, model) if keep.manifest(model).exists() else None
    if run.manifest(model).exists() or manifest is None:
        keep.root.delete()
        return None
    for loc in walk_files(keep.root):
        if loc != keep.manifest(model):
            loc.move_to(run.root / _relative(keep, loc))
    for idx, loc in shard_files(run, model).items():
        if loc.name not in manifest.shards:  # a shard the restored embeddings never had
            loc.delete()
            run.shard_marker(model, idx).delete()
    why = _restorable(run, model, manifest)
    if why is None:
        write_manifest(run, manifest)
    keep.root.delete()
    if why is not None:
        return (f"{model}: its previous embeddings could not be put back whole ({why}); "
                "embed it again once its images can be read")
    return f"{model}: its previous embeddings are back in {run.model_dir(model)}"


def _remove_shard_dirs(run: RunDir, model: str) -> list[str]:
    """Delete directories where shard files belong (a shard could never be written there)."""
    removed = []
    for d in run.model_dir(model).dirs():
        if shard_index(d.name) is not None:
            log.warning("%s: removing %s (a directory where a shard belongs)", model, d)
            d.delete()
            removed.append(d.name)
    return removed


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

def device_for(cfg: Config, resources: dict[str, float]) -> str:
    """The actors' device: the config's, else cuda when the cluster has a GPU."""
    if cfg.embed.device != "auto":
        return cfg.embed.device
    return "cuda" if resources.get("GPU", 0) > 0 else "cpu"


def dtype_for(cfg: Config, mcfg: ModelRunConfig, device: str) -> str:
    """The model's dtype: its setting, else embed.dtype, else float16 on cuda and float32 on CPU."""
    dtype = mcfg.dtype if mcfg.dtype != "auto" else cfg.embed.dtype
    if dtype == "auto":
        return "float16" if device == "cuda" else "float32"
    return dtype


#: Logical CPUs of an actor of a `light` model (ModelSpec.light: the pixels baseline).
LIGHT_ACTOR_CPUS = 0.25


def actor_cpus(cfg: Config, mcfgs: dict[str, ModelRunConfig], total_cpus: float) -> dict[str, float]:
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


def torch_threads(name: str, cpus: float, todo: dict[str, set[int]], device: str,
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


@dataclass(frozen=True)
class ResourcePlan:
    """What each model's actor pool runs on and asks the cluster for (live models only, except
    `dtypes`, which names every model's dtype for its manifest)."""

    device: str
    dtypes: dict[str, str]
    cpus: dict[str, float]  # logical CPUs per actor
    gpus: dict[str, float]  # GPUs per actor
    threads: dict[str, int]  # torch intra-op threads per actor
    batch_sizes: dict[str, int]


def plan_resources(
    cfg: Config, mcfgs: dict[str, ModelRunConfig], todo: dict[str, set[int]], resources: dict[str, float]
) -> ResourcePlan:
    """The resource plan of the models in `mcfgs` on a cluster of `resources` (Ray's totals);
    DataError when the actor pools cannot fit."""
    from flagsim.models import get_spec

    device = device_for(cfg, resources)
    live = {m: c for m, c in mcfgs.items() if todo[m]}
    cpus = actor_cpus(cfg, live, resources["CPU"])
    return ResourcePlan(
        device=device,
        dtypes={m: dtype_for(cfg, c, device) for m, c in mcfgs.items()},
        cpus=cpus,
        gpus={m: gpus_per_actor(c, device) for m, c in live.items()},
        threads={m: c.torch_threads or torch_threads(m, cpus[m], todo, device, resources)
                 for m, c in live.items()},
        batch_sizes={m: c.batch_size or get_spec(m).default_batch_size for m, c in live.items()},
    )
