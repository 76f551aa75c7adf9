"""Vector arithmetic of cosine search: L2 normalisation and the ensemble's concatenated vectors."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)


#: Zero-vector warnings already given by this process: one command normalises the same rows
#: several times (index build, the session's reads, the ensemble), and said so each time.
_warned: set[str] = set()


def normalise(vectors: np.ndarray, source: str | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous); all-zero rows stay zero.

    The one normalisation of cosine search (index build, stored and query vectors). Norms are
    summed and rows divided in float64, cast back to float32 element by element (no float64
    copy of the batch): any finite float32 row, from ~1e-45 (denormal) to ~3e38, becomes an
    exact unit vector, where float32 norms overflowed to inf (a huge row became all zeros) or
    lost the digits of denormals (their rows came out ~6% short of unit length).
    All-zero rows are warned about once per process and `source` (what the rows are, e.g. a
    shard), however often the same rows are normalised.
    """
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = norms == 0
    if zero.any():
        text = (f"{int(zero.sum())} zero vector(s){f' in {source}' if source else ''}: their cosine "
                f"similarity is 0 to everything")
        if text not in _warned:
            _warned.add(text)
            log.warning("%s", text)
    norms[zero] = 1.0
    np.divide(x, norms[:, None], out=x, casting="unsafe")
    return x


def ensemble_vectors(per_model: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenated normalised vectors scaled by 1/sqrt(M): their inner product = mean cosine.

    Concatenated in `catalog.model_order`, not the mapping's order, so that a query's vector
    lines up with the index's however the models were named.
    """
    from flagsim.search.catalog import model_order

    if not per_model:
        raise ValueError("no models to ensemble")
    scale = np.float32(1.0 / math.sqrt(len(per_model)))
    return np.ascontiguousarray(
        np.concatenate([normalise(per_model[m]) * scale for m in model_order(per_model)], axis=1)
    )
