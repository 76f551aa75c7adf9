"""torchvision classifiers (VGG16) as embedders: the logits or the penultimate layer."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flagsim.errors import WeightsUnavailableError
from flagsim.models.base import Embedder, Pooling
from flagsim.models.sources import Resolved, WeightFile
from flagsim.models.transforms import ImageTransform, TransformEmbedder

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


def _penultimate(e: Embedder, pixels: torch.Tensor) -> torch.Tensor:
    """VGG-style `features -> avgpool -> flatten -> classifier` stopped one layer early."""
    x = torch.flatten(e.model.avgpool(e.model.features(pixels)), 1)
    return e.model.classifier[:-1](x)


#: `logits` = the class scores; `penultimate` = the input of the last classifier layer (VGG16's
#: 4096-d fc7 after its ReLU).
POOLINGS: dict[str, Pooling] = {
    "logits": Pooling(run=lambda e, px: e.model(px), dim=lambda e: e.model.classifier[-1].out_features),
    "penultimate": Pooling(run=_penultimate, dim=lambda e: e.model.classifier[-1].in_features),
}


def vgg_variant(config: Mapping[str, Any]) -> nn.Module:
    """A torchvision VGG of other widths, on the meta device: `layers` in torchvision's
    `make_layers` notation (channel counts and "M" for a max-pool), `hidden` the two classifier
    widths, `num_classes` the logits (`{"layers": cfgs["D"], "hidden": [4096, 4096],
    "num_classes": 1000}` is vgg16 itself). Read from the config.json of a weights directory,
    for pruned or narrowed VGGs (and the small test checkpoints of flagsim.models.testing)."""
    from torchvision.models.vgg import VGG, make_layers

    layers = [v if v == "M" else int(v) for v in config["layers"]]
    h1, h2 = (int(v) for v in config["hidden"])
    width = [v for v in layers if v != "M"][-1]
    with torch.device("meta"):
        model = VGG(make_layers(layers), num_classes=int(config["num_classes"]), init_weights=False)
        model.classifier = nn.Sequential(
            nn.Linear(width * 7 * 7, h1), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(h1, h2), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(h2, int(config["num_classes"])),
        )
    return model


class TorchvisionEmbedder(TransformEmbedder):
    """A torchvision classifier (built by `spec.architecture`, or a VGG variant described by
    the weights directory's config.json), pooled as the spec says."""

    POOLINGS = POOLINGS
    model: nn.Module
    transform: ImageTransform

    def _load(self, resolved: Resolved) -> None:
        import torchvision.models as tvm

        assert isinstance(resolved, WeightFile)
        path = resolved.path
        sd = load_state_dict_file(path, self.spec.name)
        self.weights_file = path.name
        if resolved.config is not None:
            try:
                model = vgg_variant(json.loads(resolved.config.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise WeightsUnavailableError(
                    f"{self.spec.name}: {resolved.config} does not describe a VGG "
                    f"({type(exc).__name__}); remove it to load a {self.spec.architecture}"
                ) from None
        else:
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
