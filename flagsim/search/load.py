"""The index of a model for searching: the saved one when fresh, else built (or a clear error)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from flagsim.config import Config, IndexConfig
from flagsim.errors import DataError
from flagsim.rundir import RunDir
from flagsim.search.build import build_index
from flagsim.search.manifest import read_index_manifest
from flagsim.search.model_index import ModelIndex
from flagsim.search.saved import index_state, open_index

log = logging.getLogger(__name__)


def load_index(
    run_dir: str | RunDir, model: str, cfg: IndexConfig | None = None, *, build: bool = True,
    rebuild_on_settings: bool = False, models: Sequence[str] | None = None, verify: bool = False,
    cluster: Config | None = None,
) -> ModelIndex:
    """The index of `model` (or of the ensemble `all` of `models`): loaded when fresh, else
    (re)built when `build`, else DataError.

    Loading memory-maps the index files and checks their sizes against the manifest (the full
    sha256 check is `verify=True`, which `flagsim index --check` and the neighbours job use).
    Any fresh index is
    accepted whatever it was built with, unless `rebuild_on_settings` (then one built with
    settings other than `cfg` is rebuilt).

    A build runs in this process, or as a Ray task (`build_tasks.ensure_indexes`) when
    `cluster` names a Ray cluster (RAY_ADDRESS or its ray.address), as `flagsim index` does:
    no driver of a cluster holds an index it builds.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.at(run_dir)
    cfg = cfg or IndexConfig()
    state, reason = index_state(run, model, cfg if rebuild_on_settings else None, models=models)
    if state == "fresh":
        manifest = read_index_manifest(run, model)
        assert manifest is not None
        try:
            return open_index(run, model, manifest, cfg, verify)
        except DataError as exc:
            if not build:
                raise
            log.warning("%s; rebuilding", exc)
            return _build(run, model, cfg, models, cluster)
    if not build:
        if state == "missing":
            raise DataError(f"{reason} for model {model} (run `flagsim index --models {model}`)")
        raise DataError(f"{reason}; rebuild with `flagsim index --models {model}`")
    if state == "stale":
        log.info("%s; rebuilding", reason)
    return _build(run, model, cfg, models, cluster)


def _build(run: RunDir, model: str, cfg: IndexConfig, models: Sequence[str] | None,
           cluster: Config | None) -> ModelIndex:
    from flagsim.pipeline.ray_session import ray_address

    if cluster is None or ray_address(cluster) is None:
        return build_index(run, model, cfg, models=models)
    from flagsim.search.build_tasks import ensure_indexes

    built = ensure_indexes(run, [(model, tuple(models or ()))],
                           cluster.model_copy(update={"index": cfg}), on_ray=True, force=True)
    return open_index(run, model, built[0].manifest, cfg)
