"""Weight-free models: the image's colour layout as a pixel vector, or as colour-layout features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flagsim.models.base import Embedder, Pooling, check_images, jsonable
from flagsim.models.layout import PALETTE, colour_layout, layout_dim
from flagsim.models.sources import Resolved
from flagsim.models.transforms import ImageTransform


class PixelsEmbedder(Embedder):
    """Squash each image to `processor["resize"]` ([height, width]) with antialiasing and
    normalise (`mean`, `std`); then `flatten` (channel-major: cosine similarity compares colour
    layouts) or `colour_layout` (flagsim.models.layout, with the spec's `options`; needs the
    pixels in 0..1: mean 0, std 1). Alpha is composited on white by the decoder before images
    get here."""

    POOLINGS = {
        "flatten": Pooling(run=lambda e, px: px.flatten(1), dim=lambda e: 3 * e.transform.resize[0]
                           * e.transform.resize[1]),
        "colour_layout": Pooling(run=lambda e, px: colour_layout(px, e.spec.options),
                                 dim=lambda e: layout_dim(e.spec.options)),
    }
    transform: ImageTransform

    def _load(self, resolved: Resolved) -> None:
        self.weights = None
        self.transform = ImageTransform(self.spec.processor)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arrays = check_images(images, self.spec.name)
        return self.transform(arrays, device=self.preprocess_device).to(self.device, self.dtype)

    def processor_settings(self) -> dict[str, Any]:
        settings = self.transform.describe()
        if self.spec.pooling == "colour_layout":
            settings["layout"] = {key: jsonable(value) for key, value in self.spec.options.items()}
            settings["layout"]["palette"] = {k: list(v) for k, v in PALETTE.items()}
        return settings
