"""A weight-free baseline: the image's colour layout as a small, centred pixel vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flagsim.models.base import Embedder, check_images
from flagsim.models.transforms import ImageTransform


class PixelsEmbedder(Embedder):
    """Squash each image to `processor["resize"]` ([height, width]) with antialiasing, scale to
    -1..1 and flatten (channel-major). Cosine similarity of these vectors compares colour
    layouts. Alpha is composited on white by the decoder before images get here."""

    transform: ImageTransform

    def _build_tiny(self) -> None:
        self._load()  # nothing to load: tiny and real are the same

    def _load(self) -> None:
        self.weights = None
        self.transform = ImageTransform(self.spec.processor)
        h, w = self.transform.resize
        self.dim = 3 * h * w

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arrays = check_images(images, self.spec.name)
        return self.transform(arrays, device=self.preprocess_device).to(self.device, self.dtype)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)

    def processor_settings(self) -> dict[str, Any]:
        return self.transform.describe()
