"""The run-directory layout: where each table, shard, index and report of one run lives."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from flagsim.storage import Location

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
        return self.embeddings / f"model={model}"

    def manifest(self, model: str) -> Location:
        return self.model_dir(model) / "_manifest.json"

    def shard(self, model: str, index: int) -> Location:
        return self.model_dir(model) / shard_name(index)

    def embedded_models(self) -> list[str]:
        return [d.name.split("=", 1)[1] for d in self.embeddings.dirs() if d.name.startswith("model=")]

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

    @property
    def errors(self) -> Location:
        return self.root / "errors"

    def errors_dir(self, stage: str) -> Location:
        return self.errors / stage

    @property
    def report(self) -> Location:
        return self.root / "report.html"
