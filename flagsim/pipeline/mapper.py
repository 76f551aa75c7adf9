"""Mapper: a plain callable class that loads one model once and embeds batches of decoded images."""

from __future__ import annotations

import logging
import os

import numpy as np

from flagsim.pipeline.reader import OK, PIXELS

log = logging.getLogger(__name__)


def _node_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def embedding_column(model: str) -> str:
    return f"emb:{model}"


class EmbedActor:
    """Ray Data actor: `__init__` loads the model, `__call__` adds an `emb:<model>` column.

    Every input column passes through unchanged; rows whose image failed to decode (ok=False)
    get a zero vector and are never fed to the model.

    With `micro_batch` set, every forward pass has exactly that batch shape (the last chunk is
    padded with copies of its last image): a row's embedding then does not depend on which other
    images shared its batch, so reruns and resumed runs are bit-identical on CPU.
    """

    def __init__(
        self,
        model: str,
        *,
        weights: str | None = None,
        revision: str | None = None,
        device: str = "cpu",
        preprocess_device: str | None = None,
        dtype: str = "auto",
        torch_threads: int | None = None,
        tiny: bool = False,
        micro_batch: int | None = None,
        describe_to: str | None = None,
    ) -> None:
        import torch

        from flagsim.models import create_embedder

        if torch_threads:  # never more than this node's cores (the plan counts the cluster's)
            torch.set_num_threads(max(1, min(torch_threads, _node_cores())))
        self.model = model
        self.column = embedding_column(model)
        self.micro_batch = micro_batch
        self.embedder = create_embedder(
            model, weights=weights, revision=revision, device=device, dtype=dtype, tiny=tiny,
            preprocess_device=preprocess_device,
        )
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
                if self.micro_batch and n < step:
                    chunk = chunk + [chunk[-1]] * (step - n)
                parts.append(np.asarray(self.embedder(chunk))[:n])
            out[ok] = np.concatenate(parts).astype(np.float32, copy=False)
        result = dict(batch)
        result[self.column] = out
        return result
