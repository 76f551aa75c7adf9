"""The run-directory layout: where each table, shard, index and report of one run lives."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from flagsim.storage import Location

#: Folder of the run's sidecar files (manifests, markers): outside every table folder.
META_DIR = "_meta"

_SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunDir:
    """Paths of one run. See docs/layout.md for the tables' columns."""

    root: Location

    @classmethod
    def at(cls, location: str | os.PathLike | Location) -> RunDir:
        loc = location if isinstance(location, Location) else Location.parse(location)
        return cls(loc)

    @property
    def images_table(self) -> Location:
        return self.root / "images.parquet"

    @property
    def images_dir(self) -> Location:
        return self.root / "images"

    @property
    def embeddings(self) -> Location:
        return self.root / "embeddings"

    def model_dir(self, model: str) -> Location:
        """The model's table folder: Parquet shards only (see `meta_dir` for its sidecars)."""
        return self.embeddings / f"model={model}"

    # Sidecars live under `_meta/`, outside every table folder, so that pandas, pyarrow, polars
    # and DuckDB read a table folder whole without tripping over JSON files.
    @property
    def meta(self) -> Location:
        return self.root / META_DIR

    def meta_dir(self, model: str) -> Location:
        """Sidecars of one model's embeddings: run key, manifest, per-shard markers."""
        return self.meta / "embeddings" / f"model={model}"

    def manifest(self, model: str) -> Location:
        return self.meta_dir(model) / "manifest.json"

    def run_marker(self, model: str) -> Location:
        """What the model's shards are being made from (the resume key)."""
        return self.meta_dir(model) / "run.json"

    def embedder_info(self, model: str) -> Location:
        """What the first actor of the model loaded (Embedder.describe())."""
        return self.meta_dir(model) / "embedder.json"

    def shard_marker(self, model: str, index: int) -> Location:
        """Completion marker of one shard: rows, bytes and sha256 of the file as written."""
        return self.meta_dir(model) / "shards" / shard_name(index).replace(".parquet", ".json")

    def shard(self, model: str, index: int) -> Location:
        return self.model_dir(model) / shard_name(index)

    @property
    def staging(self) -> Location:
        """Where atomic writes of table files stage their temporary files (never a table folder)."""
        return self.root / "_tmp"

    def embedded_models(self) -> list[str]:
        """Models with an embeddings folder or sidecars in this run."""
        found = {d.name.split("=", 1)[1] for d in self.embeddings.dirs() if d.name.startswith("model=")}
        found |= {d.name.split("=", 1)[1] for d in (self.meta / "embeddings").dirs()
                  if d.name.startswith("model=")}
        return sorted(found)

    def legacy_manifest(self, model: str) -> Location:
        """Where layout 1 (flagsim 0.1 before the sidecars moved) kept the manifest."""
        return self.model_dir(model) / "_manifest.json"

    @property
    def index_dir(self) -> Location:
        return self.root / "index"

    def index_path(self, model: str) -> Location:
        return self.index_dir / f"model={model}"

    @property
    def neighbours(self) -> Location:
        return self.root / "neighbours"

    def neighbours_dir(self, model: str) -> Location:
        return self.neighbours / f"model={model}"

    def neighbours_manifest(self, model: str) -> Location:
        return self.meta / "neighbours" / f"model={model}" / "manifest.json"

    @property
    def dedup(self) -> Location:
        return self.root / "dedup"

    def dedup_dir(self, model: str) -> Location:
        return self.dedup / f"model={model}"

    def dedup_manifest(self, model: str) -> Location:
        return self.meta / "dedup" / f"model={model}" / "manifest.json"

    @property
    def errors(self) -> Location:
        return self.root / "errors"

    def errors_dir(self, stage: str) -> Location:
        return self.errors / stage

    @property
    def report(self) -> Location:
        return self.root / "report.html"
