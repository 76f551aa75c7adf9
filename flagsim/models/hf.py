"""Hugging Face transformers vision models (ViT, CLIP, DINOv2, EfficientNet) and their processors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flagsim.models.base import Embedder, Pooling, check_images, jsonable
from flagsim.models.sources import HFCheckpoint, Resolved

log = logging.getLogger(__name__)

#: Processor settings reported in describe() (the rest of to_dict() is bookkeeping).
PROCESSOR_KEYS = (
    "image_processor_type",
    "do_convert_rgb",
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "rescale_offset",
    "do_normalize",
    "image_mean",
    "image_std",
    "include_top",
    "do_pad",
)


def processor_settings(processor: Any) -> dict[str, Any]:
    d = processor.to_dict()
    d.setdefault("image_processor_type", type(processor).__name__)
    return jsonable({k: d[k] for k in PROCESSOR_KEYS if d.get(k) is not None})


def make_processor(spec_class: str | None, settings: dict[str, Any], checkpoint: HFCheckpoint | None,
                   name: str):
    """The checkpoint's own image processor when it has one, else `spec_class(**settings)`."""
    import transformers

    if checkpoint is not None and checkpoint.preprocessor is not None:
        return transformers.AutoImageProcessor.from_pretrained(
            str(checkpoint.preprocessor.parent), local_files_only=True
        )
    if checkpoint is not None:
        log.warning(
            "%s: %s has no preprocessor_config.json; using the registry's processor settings",
            name, checkpoint.directory,
        )
    if not spec_class:
        raise ValueError(f"{name}: no processor class registered")
    return getattr(transformers, spec_class)(**dict(settings))


def _efficientnet_stage_width(e: Embedder) -> int:
    from transformers.models.efficientnet.modeling_efficientnet import round_filters

    cfg = e.model.config
    return int(round_filters(cfg, cfg.out_channels[-1]))


def _image_features(e: Embedder, pixels: torch.Tensor) -> torch.Tensor:
    feats = e.model.get_image_features(pixel_values=pixels)
    return feats if isinstance(feats, torch.Tensor) else feats.pooler_output


#: Poolings of transformers vision models: `cls` = last_hidden_state[:, 0]; `image_features` =
#: get_image_features (the projected pooler output); `stage_mean` = mean over H, W of
#: hidden_states[-1].
POOLINGS: dict[str, Pooling] = {
    "cls": Pooling(
        run=lambda e, px: e.model(pixel_values=px).last_hidden_state[:, 0],
        dim=lambda e: e.model.config.hidden_size,
    ),
    "image_features": Pooling(run=_image_features, dim=lambda e: e.model.config.projection_dim),
    "stage_mean": Pooling(
        run=lambda e, px: e.model(pixel_values=px, output_hidden_states=True)
        .hidden_states[-1].mean(dim=(2, 3)),
        dim=_efficientnet_stage_width,
    ),
}


class TransformersEmbedder(Embedder):
    """A transformers model class loaded with from_pretrained, pooled as the spec says."""

    POOLINGS = POOLINGS
    model: torch.nn.Module
    processor: Any

    def _model_class(self):
        import transformers

        return getattr(transformers, self.spec.architecture)

    def _load(self, resolved: Resolved) -> None:
        assert isinstance(resolved, HFCheckpoint)
        self.revision = resolved.revision
        log.info("%s: loading %s from %s", self.spec.name, self.spec.architecture, resolved.directory)
        self.model = self._model_class().from_pretrained(
            str(resolved.directory), dtype=self.dtype, local_files_only=True, weights_only=True
        )
        self.processor = make_processor(self.spec.processor_class, dict(self.spec.processor),
                                        resolved, self.spec.name)
        self._finish()

    def _finish(self) -> None:
        self.model = self.model.to(self.device, self.dtype).eval()

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arrays = check_images(images, self.spec.name)
        kwargs = {}
        if self.preprocess_device.type != "cpu":  # torchvision-backed processors take `device`
            kwargs["device"] = str(self.preprocess_device)
        out = self.processor(
            images=arrays, return_tensors="pt", input_data_format="channels_last", **kwargs
        )
        return out["pixel_values"].to(self.device, self.dtype)

    def processor_settings(self) -> dict[str, Any]:
        return processor_settings(self.processor)
