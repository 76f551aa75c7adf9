"""Mapper: a plain callable class that loads one model once and embeds batches of decoded images."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from flagsim.models.options import EmbedOptions
from flagsim.pipeline.reader import OK, PIXELS

log = logging.getLogger(__name__)


def _node_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def embedding_column(model: str) -> str:
    return f"emb:{model}"


#: The smallest padded forward shape: short tails share one shape instead of one each.
MIN_BUCKET = 8


def padded_size(n: int, micro_batch: int) -> int:
    """The forward batch shape for a chunk of `n` images: the next power of two (at least
    MIN_BUCKET), never above `micro_batch`. Full chunks are exactly `micro_batch`."""
    if n >= micro_batch:
        return micro_batch
    return min(micro_batch, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


class EmbedActor:
    """Ray Data actor: `__init__` loads the model, `__call__` adds an `emb:<model>` column.

    Every input column passes through unchanged; rows whose image failed to decode (ok=False)
    get a zero vector and are never fed to the model.

    With `micro_batch` set, a call's images go through the model in chunks of exactly that many;
    the last, shorter chunk is padded (copies of its last image) only up to a fixed bucket, the
    next power of two of at least MIN_BUCKET (`padded_size`): 10 images at batch 512 run one
    forward of 16, not 512. Forward shapes come from a small fixed set, so a rerun over the same
    batches is bit-identical on CPU; a row's vector does not depend on the images it shares a
    chunk with (on CPU every family gave bit-identical rows at every bucket of 8 and more; an
    unpadded odd shape such as 10 need not, which is why tails are padded at all).
    """

    def __init__(
        self,
        model: str,
        options: EmbedOptions | None = None,
        *,
        describe_to: str | None = None,
        **changes: Any,
    ) -> None:
        """Load `model` with `options` (keywords: EmbedOptions fields); with `describe_to`,
        write what was loaded there (for the manifest) unless it exists."""
        import torch

        from flagsim.models import create_embedder

        options = EmbedOptions.of(options, **changes)
        if options.torch_threads:  # never more than this node's cores (the plan counts the cluster's)
            torch.set_num_threads(max(1, min(options.torch_threads, _node_cores())))
        self.model = model
        self.column = embedding_column(model)
        self.micro_batch = options.micro_batch
        self.embedder = create_embedder(model, options)
        self.dim = self.embedder.dim
        if describe_to:  # what was really loaded (checkpoint, revision, processor) for the manifest
            from flagsim.storage import Location

            loc = Location.parse(describe_to)
            if not loc.exists():
                loc.write_json({**self.embedder.describe(), "torch_threads": torch.get_num_threads()})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch[OK], dtype=bool)
        pixels = batch[PIXELS]
        good = [pixels[i] for i in np.flatnonzero(ok)]
        out = np.zeros((len(ok), self.dim), dtype=np.float32)
        if good:
            step = self.micro_batch or len(good)
            parts = []
            for i in range(0, len(good), step):
                chunk = good[i : i + step]
                n = len(chunk)
                if self.micro_batch:
                    chunk = chunk + [chunk[-1]] * (padded_size(n, step) - n)
                parts.append(np.asarray(self.embedder(chunk))[:n])
            out[ok] = np.concatenate(parts).astype(np.float32, copy=False)
        result = dict(batch)
        result[self.column] = out
        return result
