"""Id and name columns of an index kept as Arrow arrays: vectorised lookups, no per-row Python."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def as_string_array(values: Any) -> pa.Array:
    """`values` (an Arrow array or chunked array, a list or a NumPy array) as one string array."""
    if isinstance(values, Column):
        return values.arrow
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.string()) if values.type != pa.string() else values
    return pa.array([str(v) for v in values], pa.string())


class Column:
    """A read-only string column indexed like a NumPy object array.

    `col[i]` is a str; `col[positions]` (an int array of any shape) is an object array of that
    shape; iteration yields str. Backed by one Arrow array, so a 300k-row column costs one
    buffer, not 300k Python strings, until rows are asked for.
    """

    def __init__(self, values: Any) -> None:
        self.arrow = as_string_array(values)

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            return self.arrow[int(key)].as_py()
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self.arrow))
            if step == 1:
                return np.array(self.arrow.slice(start, max(0, stop - start)).to_pylist(), dtype=object)
            key = np.arange(start, stop, step)
        pos = np.asarray(key, dtype=np.int64)
        taken = self.arrow.take(pa.array(pos.ravel()))
        return np.array(taken.to_pylist(), dtype=object).reshape(pos.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrow.to_pylist())

    def tolist(self) -> list[str]:
        return self.arrow.to_pylist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self.arrow.to_pylist(), dtype=object)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Column) and self.arrow.equals(other.arrow)

    __hash__ = None  # type: ignore[assignment]

    def index(self, value: str) -> int | None:
        """The first position holding `value`, or None (one vectorised scan)."""
        pos = pc.index(self.arrow, pa.scalar(value, pa.string())).as_py()
        return None if pos is None or pos < 0 else int(pos)

    def positions(self, values: Sequence[str | None] | Iterable[str | None]) -> np.ndarray:
        """Position of each of `values` (-1 where absent), by one hash lookup."""
        want = pa.array([None if v is None else str(v) for v in values], pa.string())
        found = pc.index_in(want, value_set=self.arrow)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
