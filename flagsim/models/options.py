"""`EmbedOptions`: how to build and run one embedder (one object, not keyword lists repeated)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EmbedOptions:
    """The choices a caller makes about one model (its spec fixes the rest).

    `weights`/`revision` override the registry's default source (see flagsim.models.sources;
    `revision` alone applies to the default hub id). `device` is auto, cpu, cuda or cuda:N;
    `preprocess_device` is where images are resized and normalised (None: the model's device).
    `dtype` "auto" means float16 on CUDA and float32 on CPU. `torch_threads` caps torch's CPU
    threads in an actor (never above the node's cores) and `micro_batch` is the actor's fixed
    forward batch (see flagsim.pipeline.mapper.EmbedActor).
    """

    weights: str | None = None
    revision: str | None = None
    device: str = "cpu"
    preprocess_device: str | None = None
    dtype: str = "auto"
    torch_threads: int | None = None
    micro_batch: int | None = None

    def replace(self, **changes: Any) -> EmbedOptions:
        """A copy with `changes` (TypeError naming an unknown field)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, options: EmbedOptions | None = None, **changes: Any) -> EmbedOptions:
        """`options` (or the defaults) with `changes`: the keyword form callers may use."""
        return (options or cls()).replace(**changes) if changes else (options or cls())
