"""Arrow schemas of every table flagsim reads or writes (images, embeddings, neighbours, errors)."""

from __future__ import annotations

import pyarrow as pa

#: 2: the `model` column left the files (it is the `model=<name>` folder, a Hive partition),
#: embeddings became `list<float32>` (one schema for every model, whatever its dimension), and
#: the sidecars moved to `_meta/`. See docs/layout.md.
SCHEMA_VERSION = 2

#: The images table (`images.parquet`): one row per input image.
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # stable across runs: the file stem
        pa.field("name", pa.string(), nullable=False),  # display name (country for flags)
        pa.field("path", pa.string(), nullable=False),  # local path or URI of the image file
        pa.field("source_url", pa.string()),  # where it was downloaded from, if anywhere
        pa.field("sha256", pa.string()),  # of the file bytes
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),  # PIL format name, e.g. PNG
        # Where the bytes live when `path` is not the image file itself (see IMAGE_REF_COLUMNS):
        pa.field("container", pa.string()),  # None: a plain file; "tar" or "parquet"
        pa.field("member", pa.string()),  # tar: the member's name; parquet: the image column
        pa.field("offset", pa.int64()),  # tar: byte offset of the member's data; parquet: row
        pa.field("size", pa.int64()),  # tar: the member's size in bytes; parquet: None
    ]
)

#: Columns of IMAGES_SCHEMA that tables written before the inputs issue lack; a reader adds
#: them as nulls (a plain file per row).
IMAGE_REF_COLUMNS = ("container", "member", "offset", "size")
CONTAINER_TAR = "tar"
CONTAINER_PARQUET = "parquet"

IMAGE_ID_COLUMNS = ("image_id", "name")

#: The partition key of every per-model table folder (`<table>/model=<name>/part-NNNNN.parquet`).
#: It is not a column of the files: readers get it from the folder (Hive partitioning).
PARTITION_KEY = "model"

#: Keys of an embedding shard's Parquet key-value metadata (what the file was written as).
META_MODEL = b"flagsim.model"
META_DIM = b"flagsim.dim"
META_SHARD = b"flagsim.shard"
META_SCHEMA = b"flagsim.schema_version"

#: One embedding shard (`embeddings/model=<name>/part-NNNNN.parquet`); the same for every model.
EMBEDDING_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),  # raw, not normalised
    ]
)


def embedding_schema(dim: int, model: str | None = None, shard: int | None = None) -> pa.Schema:
    """EMBEDDING_SCHEMA with the shard's key-value metadata (dimension, model, shard)."""
    if dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    meta = {META_DIM: str(dim).encode(), META_SCHEMA: str(SCHEMA_VERSION).encode()}
    if model is not None:
        meta[META_MODEL] = model.encode()
    if shard is not None:
        meta[META_SHARD] = str(shard).encode()
    return EMBEDDING_SCHEMA.with_metadata(meta)


#: One part of a batch neighbour table (`neighbours/model=<name>/part-NNNNN.parquet`).
NEIGHBOURS_FILE_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1-based
        pa.field("neighbour_id", pa.string(), nullable=False),
        pa.field("neighbour", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # cosine similarity
    ]
)

#: The neighbours job's stream (search actors to the driver): the file's columns, plus the query
#: shard, the query's row in it and the shard's row count; a query without any hit has one row
#: of rank 0 (no neighbour), dropped when the part is written.
NEIGHBOUR_ROWS_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("expected", pa.int64(), nullable=False),
        *(f.with_nullable(f.name not in ("query_id", "query", "rank"))
          for f in NEIGHBOURS_FILE_SCHEMA),
    ]
)

#: A neighbour table as flagsim returns it in memory: the folder's model as the first column.
NEIGHBOURS_SCHEMA = pa.schema(
    [pa.field(PARTITION_KEY, pa.string(), nullable=False), *NEIGHBOURS_FILE_SCHEMA]
)

#: Near-duplicate groups (`dedup/model=<name>/part-00000.parquet`): one row per image in a group.
DEDUP_FILE_SCHEMA = pa.schema(
    [
        pa.field("group", pa.int64(), nullable=False),  # 0-based, ordered by representative id
        pa.field("size", pa.int32(), nullable=False),  # images in the group
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("representative_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # cosine to the representative
    ]
)

#: `index/model=<m>/ids.parquet`: the image at each index position, in position order.
INDEX_IDS_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string(), nullable=False), pa.field("name", pa.string(), nullable=False)]
)

#: Errors table (`errors/<stage>/part-NNNNN.parquet`): one row per failed item.
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("name", pa.string()),
        pa.field("path", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # images | download | decode
        pa.field("model", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def check_columns(table: pa.Table, schema: pa.Schema, what: str) -> None:
    """Raise DataError naming `what` when `table` lacks a column of `schema`."""
    from flagsim.errors import DataError

    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DataError(f"{what} is missing column(s) {', '.join(missing)}")


def with_optional(table: pa.Table, schema: pa.Schema, optional: tuple[str, ...]) -> pa.Table:
    """`table` with each `optional` column of `schema` it lacks added as nulls."""
    for name in optional:
        if name not in table.column_names:
            field = schema.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema` (same column order); a null in a column
    the schema requires, or a value that does not cast, is a DataError naming the column."""
    from flagsim.errors import DataError

    table = table.select([f.name for f in schema])
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise DataError(f"column {f.name!r} has {table.column(f.name).null_count} empty (null) "
                            "value(s); every row needs one")
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise DataError(f"the columns do not fit the table's schema: {str(exc).splitlines()[0]}") from None
