"""Arrow schemas of every table flagsim reads or writes (images, embeddings, neighbours, errors)."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

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
    ]
)

IMAGE_ID_COLUMNS = ("image_id", "name")


def embedding_schema(dim: int) -> pa.Schema:
    """Schema of one embedding shard (`embeddings/model=<name>/part-NNNNN.parquet`)."""
    if dim <= 0:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("name", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


#: Batch neighbour table (`neighbours/model=<name>/part-NNNNN.parquet`).
NEIGHBOURS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1-based
        pa.field("neighbour_id", pa.string(), nullable=False),
        pa.field("neighbour", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # cosine similarity
    ]
)

#: Errors table (`errors/<stage>/part-NNNNN.parquet`): one row per failed item.
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("name", pa.string()),
        pa.field("path", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # decode | embed | scrape
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


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema` (same column order)."""
    return table.select([f.name for f in schema]).cast(schema)
