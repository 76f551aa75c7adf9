"""Vector arithmetic of cosine search: L2 normalisation and the ensemble's concatenated vectors."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous); all-zero rows stay zero."""
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    zero = norms == 0
    if zero.any():
        log.warning("%d zero vector(s): their cosine similarity is 0 to everything", int(zero.sum()))
    norms[zero] = 1.0
    x /= norms[:, None].astype(np.float32)
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
