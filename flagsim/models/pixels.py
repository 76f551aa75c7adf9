"""A weight-free baseline: the image's colour layout as a small, centred pixel vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flagsim.models.base import Embedder, Pooling, check_images
from flagsim.models.sources import Resolved
from flagsim.models.transforms import ImageTransform


class PixelsEmbedder(Embedder):
    """Squash each image to `processor["resize"]` ([height, width]) with antialiasing, scale to
    -1..1 and flatten (channel-major). Cosine similarity of these vectors compares colour
    layouts. Alpha is composited on white by the decoder before images get here."""

    POOLINGS = {
        "flatten": Pooling(run=lambda e, px: px.flatten(1), dim=lambda e: 3 * e.transform.resize[0]
                           * e.transform.resize[1]),
    }
    transform: ImageTransform

    def _load(self, resolved: Resolved) -> None:
        self.weights = None
        self.transform = ImageTransform(self.spec.processor)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arrays = check_images(images, self.spec.name)
        return self.transform(arrays, device=self.preprocess_device).to(self.device, self.dtype)

    def processor_settings(self) -> dict[str, Any]:
        return self.transform.describe()
