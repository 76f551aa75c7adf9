"""timm models as embedders (EfficientNet-Lite0 with the packaged ImageNet weights)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from flagsim.errors import WeightsUnavailableError
from flagsim.models.base import Pooling
from flagsim.models.sources import Resolved, WeightFile
from flagsim.models.transforms import ImageTransform, TransformEmbedder
from flagsim.models.tv import load_state_dict_file

log = logging.getLogger(__name__)


def map_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], name: str
) -> dict[str, torch.Tensor]:
    """`source` renamed to `target`'s keys: by name when the keys agree, else by position.

    Positional mapping is for checkpoints in another implementation's key layout (the
    EfficientNet-PyTorch layout of the packaged Lite0 weights): it requires the same number of
    tensors with equal shapes, in order, and the same last name part (weight, bias,
    running_mean, ...) for each pair.
    """
    if set(source) == set(target):
        mapped = dict(source)
    else:
        src, tgt = list(source.items()), list(target.items())
        if len(src) != len(tgt):
            raise WeightsUnavailableError(
                f"{name}: the weights hold {len(src)} tensors but the model has {len(tgt)}"
            )
        mapped = {}
        for (sk, sv), (tk, tv) in zip(src, tgt, strict=True):
            if tuple(sv.shape) != tuple(tv.shape) or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
                raise WeightsUnavailableError(
                    f"{name}: weight {sk} {tuple(sv.shape)} does not match model tensor {tk} "
                    f"{tuple(tv.shape)}"
                )
            mapped[tk] = sv
    return mapped


def _stages(e: TimmEmbedder) -> list[int]:
    return sorted(int(k) for k in e.spec.options["stages"])


def stage_means(e: TimmEmbedder, pixels: torch.Tensor) -> torch.Tensor:
    """Features from several depths of an EfficientNet-style timm model: the spatial mean of
    the output of each block stage in `spec.options["stages"]` (indexes into `model.blocks`),
    each L2-normalised, concatenated and scaled by 1/sqrt(stages) (so cosine similarity is the
    mean of the stages' cosines). Only the stem and the blocks up to the deepest stage run."""
    m = e.model
    stages = _stages(e)
    x = m.bn1(m.conv_stem(pixels))
    parts = []
    for k, block in enumerate(m.blocks[: stages[-1] + 1]):
        x = block(x)
        if k in stages:
            parts.append(F.normalize(x.float().mean(dim=(2, 3)), dim=1))
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


def stage_channels(e: TimmEmbedder) -> int:
    """The width of `stage_means`: the output channels of each chosen stage's last conv."""
    total = 0
    for k in _stages(e):
        convs = [c for c in e.model.blocks[k].modules() if isinstance(c, nn.Conv2d)]
        total += convs[-1].out_channels
    return total


class TimmEmbedder(TransformEmbedder):
    """A timm model with its classifier removed (num_classes=0): the pooled pre-logits features
    (`pooled`), or the pooled features of several depths (`stage_means`).
    """

    POOLINGS = {
        "pooled": Pooling(run=lambda e, px: e.model(px), dim=lambda e: e.model.num_features),
        "stage_means": Pooling(run=stage_means, dim=stage_channels),
    }
    model: nn.Module
    transform: ImageTransform
    mapped_tensors: int = 0

    def _load(self, resolved: Resolved) -> None:
        import timm

        assert isinstance(resolved, WeightFile)
        path = resolved.path
        sd = load_state_dict_file(path, self.spec.name)
        self.weights_file = path.name
        with torch.device("meta"):
            model = timm.create_model(self.spec.architecture, pretrained=False)
        target = model.state_dict()
        if len(sd) < len(target):  # a checkpoint saved without the classifier
            with torch.device("meta"):
                model = timm.create_model(self.spec.architecture, pretrained=False, num_classes=0)
            target = model.state_dict()
        mapped = map_state_dict(sd, target, self.spec.name)
        model.load_state_dict(mapped, strict=True, assign=True)
        self.mapped_tensors = len(mapped)
        log.info("%s: loaded %d tensors from %s", self.spec.name, len(mapped), path)
        model.reset_classifier(0)
        self.model = model
        self.transform = ImageTransform(self.spec.processor)
        self._finish()
