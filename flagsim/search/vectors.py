"""Vector arithmetic of cosine search: L2 normalisation and the ensemble's concatenated vectors."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous); all-zero rows stay zero.

    The one normalisation of cosine search (index build, stored and query vectors). Norms are
    summed and rows divided in float64, cast back to float32 element by element (no float64
    copy of the batch): any finite float32 row, from ~1e-45 (denormal) to ~3e38, becomes an
    exact unit vector, where float32 norms overflowed to inf (a huge row became all zeros) or
    lost the digits of denormals (their rows came out ~6% short of unit length).
    """
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = norms == 0
    if zero.any():
        log.warning("%d zero vector(s): their cosine similarity is 0 to everything", int(zero.sum()))
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
