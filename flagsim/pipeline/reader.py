"""Reader: the images table as a Ray dataset of decoded RGB images, one block per shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flagsim.decode import decode_image
from flagsim.errors import FlagsimError
from flagsim.pipeline.plan import ShardPlan, plan_shards  # noqa: F401  (plan_shards: old import path)
from flagsim.storage import Location

PIXELS = "pixels"
OK = "ok"
ERROR = "error"
SHARD = "shard"
PASSTHROUGH = ("image_id", "name", "path", SHARD)


def shard_tables(images: pa.Table, plans: list[ShardPlan]) -> list[pa.Table]:
    """The id columns of each planned shard's rows, with a `shard` column."""
    out = []
    for p in plans:
        t = images.slice(p.start, p.rows).select(["image_id", "name", "path"])
        out.append(t.append_column(SHARD, pa.array([p.index] * p.rows, pa.int32())))
    return out


def decode_batch(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, np.ndarray]:
    """Read and decode a batch of image files; failures become rows with ok=False and a reason."""
    images, ok, errors = [], [], []
    for path in batch["path"]:
        reason = ""
        try:
            images.append(decode_image(Location.parse(str(path)).read_bytes(), max_pixels))
        except FlagsimError as exc:  # undecodable image, or a location that cannot be opened
            reason = str(exc) or type(exc).__name__
        except (OSError, ValueError) as exc:  # missing or unreadable file
            reason = f"cannot read file: {exc}"
        if reason:
            images.append(np.zeros((1, 1, 3), np.uint8))
        ok.append(not reason)
        errors.append(reason.splitlines()[0] if reason else "")
    out = {k: batch[k] for k in PASSTHROUGH}
    out[OK] = np.array(ok, dtype=bool)
    out[ERROR] = np.array(errors, dtype=object)
    out[PIXELS] = _ragged(images)
    return out


def _ragged(images: list[np.ndarray]) -> np.ndarray:
    """An object array of HxWx3 arrays (Ray stores it as a variable-shaped tensor column)."""
    arr = np.empty(len(images), dtype=object)
    for i, im in enumerate(images):
        arr[i] = im
    return arr


def build_dataset(
    images: pa.Table,
    plans: list[ShardPlan],
    *,
    decode_batch_size: int,
    max_pixels: int,
    decode_cpus: float = 1.0,
):
    """A Ray dataset over the planned shards: id columns + ok/error + decoded `pixels`."""
    import ray

    blocks = shard_tables(images, plans)
    ds = ray.data.from_arrow(blocks)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"max_pixels": max_pixels},
        batch_size=decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(),
        num_cpus=decode_cpus,
    )
