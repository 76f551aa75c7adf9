"""Reader: the images table as a Ray dataset of decoded RGB images, one block per shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flagsim.decode import decode_image
from flagsim.errors import FlagsimError
from flagsim.pipeline.plan import ShardPlan, plan_shards  # noqa: F401  (plan_shards: old import path)
from flagsim.refs import ImageRef, read_ref
from flagsim.schema import IMAGE_REF_COLUMNS

PIXELS = "pixels"
OK = "ok"
ERROR = "error"
SHARD = "shard"
POS = "pos"  # the row's number in the images table (orders and de-duplicates a shard's rows)
PASSTHROUGH = ("image_id", "name", "path", SHARD)
#: What the read stage gets of each row: ids, and where its bytes live (a file or a reference).
READ_COLUMNS = ("image_id", "name", "path", *IMAGE_REF_COLUMNS)


def shard_tables(images: pa.Table, plans: list[ShardPlan]) -> list[pa.Table]:
    """The id and reference columns of each planned shard's rows, with a `shard` column."""
    cols = [c for c in READ_COLUMNS if c in images.column_names]
    out = []
    for p in plans:
        t = images.slice(p.start, p.rows).select(cols)
        out.append(t.append_column(SHARD, pa.array([p.index] * p.rows, pa.int32())))
    return out


def decode_batch(
    batch: dict[str, np.ndarray], max_pixels: int, jpeg_decoder: str = "pil",
    decode_device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Read and decode a batch of images; failures become rows with ok=False and a reason.

    A row's bytes are read where the images table says they live (a file, a tar member at its
    offset, a Parquet cell); this process keeps the last few containers open, so a read task
    opens each tar shard or Parquet file once. `path` comes out as the row's description
    (`shard.tar#member`, `file.parquet#row=N`), which names it in the errors table.
    `jpeg_decoder="torchvision"` decodes the batch's JPEGs with `torchvision.io.decode_jpeg` on
    `decode_device` (`decode.decode_batch_torchvision`), the rest with PIL."""
    if jpeg_decoder == "torchvision":
        return _decode_batch_torchvision(batch, max_pixels, decode_device)
    images, ok, errors, where = [], [], [], []
    n = len(batch["path"])
    refs = [ImageRef.from_row({c: batch[c][i] for c in READ_COLUMNS if c in batch}) for i in range(n)]
    for ref in refs:
        where.append(ref.describe())
        reason = ""
        try:
            images.append(decode_image(read_ref(ref), max_pixels))
        except FlagsimError as exc:  # undecodable image, or a location that cannot be opened
            reason = str(exc) or type(exc).__name__
        except (OSError, ValueError) as exc:  # missing or unreadable file
            reason = f"cannot read file: {exc}"
        if reason:
            images.append(np.zeros((1, 1, 3), np.uint8))
        ok.append(not reason)
        errors.append(reason.splitlines()[0] if reason else "")
    out = {k: batch[k] for k in PASSTHROUGH}
    out["path"] = np.array(where, dtype=object)
    out[OK] = np.array(ok, dtype=bool)
    out[ERROR] = np.array(errors, dtype=object)
    out[PIXELS] = _ragged(images)
    return out


def _decode_batch_torchvision(
    batch: dict[str, np.ndarray], max_pixels: int, device: str
) -> dict[str, np.ndarray]:
    from flagsim.decode import decode_batch_torchvision

    n = len(batch["path"])
    refs = [ImageRef.from_row({c: batch[c][i] for c in READ_COLUMNS if c in batch}) for i in range(n)]
    datas: list[bytes] = []
    reasons: list[str] = []
    for ref in refs:
        try:
            datas.append(read_ref(ref))
            reasons.append("")
        except FlagsimError as exc:
            datas.append(b"")
            reasons.append(str(exc) or type(exc).__name__)
        except (OSError, ValueError) as exc:
            datas.append(b"")
            reasons.append(f"cannot read file: {exc}")
    readable = [i for i in range(n) if not reasons[i]]
    decoded = decode_batch_torchvision([datas[i] for i in readable], device, max_pixels)
    images: list[np.ndarray] = [np.zeros((1, 1, 3), np.uint8)] * n
    for i, res in zip(readable, decoded, strict=True):
        if isinstance(res, np.ndarray):
            images[i] = res
        else:
            reasons[i] = str(res)
    out = {k: batch[k] for k in PASSTHROUGH}
    out["path"] = np.array([r.describe() for r in refs], dtype=object)
    out[OK] = np.array([not r for r in reasons], dtype=bool)
    out[ERROR] = np.array([r.splitlines()[0] if r else "" for r in reasons], dtype=object)
    out[PIXELS] = _ragged(images)
    return out


def _ragged(images: list[np.ndarray]) -> np.ndarray:
    """An object array of HxWx3 arrays (Ray stores it as a variable-shaped tensor column)."""
    arr = np.empty(len(images), dtype=object)
    for i, im in enumerate(images):
        arr[i] = im
    return arr


def read_shards(
    batch: dict[str, np.ndarray], parts: list, shard_size: int, max_pixels: int,
    jpeg_decoder: str = "pil", decode_device: str = "cpu",
) -> dict[str, np.ndarray]:
    """A read task's batch: row numbers of the images table (`data`) -> those rows, read from
    the table's row groups (kept cached per process), decoded; each row with its `pos` (row
    number) and `shard` (pos // shard_size)."""
    from flagsim.imagestable import read_positions

    pos = np.asarray(batch["data"], dtype=np.int64)
    rows = read_positions(parts, pos, READ_COLUMNS)
    b = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names}
    b[SHARD] = (pos // shard_size).astype(np.int32)
    out = decode_batch(b, max_pixels, jpeg_decoder, decode_device)
    out[POS] = pos
    return out


def build_dataset(
    images,
    plans: list[ShardPlan],
    *,
    shard_size: int,
    decode_batch_size: int,
    max_pixels: int,
    decode_cpus: float = 1.0,
    jpeg_decoder: str = "pil",
    decode_device: str = "cpu",
    decode_gpus: float = 0.0,
):
    """A Ray dataset over the planned shards: id columns + `pos` + ok/error + decoded `pixels`.

    `images` is an `imagestable.ImagesTable`: the driver sends only the row numbers of the
    shards to do (one block per shard); each read task reads its rows from the table and the
    images from where they live, streaming. With `jpeg_decoder="torchvision"` on
    `decode_device="cuda"` each read task asks Ray for `decode_gpus` of a GPU (the model actors
    must leave that much free)."""
    import ray

    # the row numbers of the shards to do, one block per shard (8 bytes a row: the table's
    # rows themselves are read by the tasks)
    blocks = [np.arange(p.start, p.stop, dtype=np.int64) for p in plans] or [np.empty(0, np.int64)]
    ds = ray.data.from_numpy(blocks)
    return ds.map_batches(
        read_shards,
        fn_kwargs={"parts": list(images.parts), "shard_size": shard_size,
                   "max_pixels": max_pixels, "jpeg_decoder": jpeg_decoder,
                   "decode_device": decode_device},
        batch_size=decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(),
        num_cpus=decode_cpus,
        num_gpus=decode_gpus if decode_device == "cuda" else 0,
    )
