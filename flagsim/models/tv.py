"""torchvision classifiers (VGG16) as embedders: the logits or the penultimate layer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flagsim.errors import WeightsUnavailableError
from flagsim.models.base import Embedder, check_images
from flagsim.models.transforms import ImageTransform
from flagsim.models.weights import parse_source, resolve_weight_file, torchvision_weights

log = logging.getLogger(__name__)


def load_state_dict_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or torch.load(weights_only=True) for .pth/.pt/.bin."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"{name}: cannot read weights file {path} ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailableError(f"{name}: weights file {path} does not hold a state dict")
    return sd


class TorchvisionEmbedder(Embedder):
    """A torchvision classifier; pooling `logits` (the class scores) or `penultimate`
    (the input of the last classifier layer, e.g. VGG16's 4096-d fc7 after its ReLU).

    `spec.tiny_config()` returns a small module of the same class (random weights).
    """

    model: nn.Module
    transform: ImageTransform

    def _build_tiny(self) -> None:
        if self.spec.tiny_config is None:
            raise ValueError(f"{self.spec.name}: no tiny config registered")
        self.model = self.spec.tiny_config()
        self.transform = ImageTransform(self.spec.tiny_processor)
        self._finish()

    def _load(self) -> None:
        import torchvision.models as tvm

        path = resolve_weight_file(self.spec, self.weights)
        src = parse_source(self.weights)
        if src.kind == "torchvision":
            torchvision_weights(self.spec, src.value or "")  # validates the enum name
        sd = load_state_dict_file(path, self.spec.name)
        self.weights_file = path.name
        with torch.device("meta"):
            model = tvm.get_model(self.spec.architecture, weights=None)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as exc:
            raise WeightsUnavailableError(
                f"{self.spec.name}: {path} is not a {self.spec.architecture} state dict "
                f"({str(exc).splitlines()[0]})"
            ) from None
        log.info("%s: loaded %s from %s", self.spec.name, self.spec.architecture, path)
        self.model = model
        self.transform = ImageTransform(self.spec.processor)
        self._finish()

    def _finish(self) -> None:
        self.model = self.model.to(self.device, self.dtype).eval()
        last = self.model.classifier[-1]
        self.dim = int(last.in_features if self.spec.pooling == "penultimate" else last.out_features)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arrays = check_images(images, self.spec.name)
        return self.transform(arrays, device=self.preprocess_device).to(self.device, self.dtype)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return classifier_features(self.model, pixels, self.spec.pooling)

    def processor_settings(self) -> dict[str, Any]:
        return self.transform.describe()


def classifier_features(model: nn.Module, pixels: torch.Tensor, pooling: str) -> torch.Tensor:
    """VGG-style `features -> avgpool -> flatten -> classifier`; `penultimate` stops one layer early."""
    if pooling == "logits":
        return model(pixels)
    if pooling == "penultimate":
        x = torch.flatten(model.avgpool(model.features(pixels)), 1)
        return model.classifier[:-1](x)
    raise ValueError(f"unknown pooling {pooling!r}")
