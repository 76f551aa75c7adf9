"""Tensor preprocessing for torchvision/timm-style models: resize, centre crop, normalise."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from flagsim.models.base import Embedder, check_images

_MODES = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class ImageTransform:
    """uint8 HxWx3 arrays -> normalised [N, 3, H, W] float tensor.

    Settings: `resize` (an int: the shorter side; or [height, width]: squash to that size),
    `crop` ([height, width] centre crop or None), `interpolation` (nearest, bilinear, bicubic),
    `antialias` (default True), `mean`/`std` (on the 0..1 scale). The order (resize the uint8
    image, crop, scale to 0..1, normalise) is that of torchvision's ImageClassification preset.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        resize = self.settings["resize"]
        self.resize: list[int] = [int(resize)] if isinstance(resize, int) else [int(v) for v in resize]
        crop = self.settings.get("crop")
        self.crop: list[int] | None = None if crop is None else [int(v) for v in crop]
        self.mode = _MODES[str(self.settings.get("interpolation", "bilinear"))]
        self.antialias = bool(self.settings.get("antialias", True))
        self.mean = torch.tensor(self.settings["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(self.settings["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def one(self, image: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
        """One uint8 CxHxW tensor at the model's input size (resized + cropped, not normalised),
        computed on `device` (default: the CPU)."""
        t = torch.from_numpy(image).to(device or "cpu").permute(2, 0, 1)
        t = F.resize(t, self.resize, interpolation=self.mode, antialias=self.antialias)
        if self.crop is not None:
            t = F.center_crop(t, self.crop)
        return t

    def __call__(
        self, images: Sequence[np.ndarray], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The normalised float32 batch, computed on `device` (default: the CPU)."""
        batch = torch.stack([self.one(im, device) for im in images]).float().div_(255.0)
        return (batch - self.mean.to(batch.device)) / self.std.to(batch.device)

    def describe(self) -> dict[str, Any]:
        return {
            "resize": self.resize if len(self.resize) > 1 else self.resize[0],
            "resize_mode": "shorter_side" if len(self.resize) == 1 else "squash",
            "crop": self.crop,
            "interpolation": self.mode.value,
            "antialias": self.antialias,
            "mean": [float(v) for v in self.settings["mean"]],
            "std": [float(v) for v in self.settings["std"]],
        }


class TransformEmbedder(Embedder):
    """An embedder whose preprocessing is an `ImageTransform` of its spec (torchvision, timm).

    A subclass's `_load` sets `self.model` and `self.transform`, then calls `_finish()`.
    """

    transform: ImageTransform

    def _finish(self) -> None:
        self.model = self.model.to(self.device, self.dtype).eval()

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arrays = check_images(images, self.spec.name)
        return self.transform(arrays, device=self.preprocess_device).to(self.device, self.dtype)

    def processor_settings(self) -> dict[str, Any]:
        return self.transform.describe()
