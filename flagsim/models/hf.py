"""Hugging Face transformers vision models (ViT, CLIP, DINOv2, EfficientNet), their processors, and
CLIP's text tower (loaded alone, for text queries)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flagsim.errors import DataError, WeightsUnavailableError
from flagsim.models.base import Embedder, Pooling, TextEncoder, check_images, jsonable, read_tensors
from flagsim.models.sources import HFCheckpoint, Resolved, Source, resolve_tokenizer

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


# --- text towers -------------------------------------------------------------------------------


def _clip_text_config(config: Any) -> Any:
    """A CLIPConfig's text config with the whole model's projection width (the text config
    alone keeps the class default, 512, whatever the checkpoint's projection is)."""
    text = getattr(config, "text_config", config)
    text.projection_dim = getattr(config, "projection_dim", text.projection_dim)
    return text


@dataclass(frozen=True)
class TextTower:
    """How a text tower class (a ModelSpec's `text_tower`) is built from its whole model's
    checkpoint: the tensors it reads, its config and width (from the checkpoint's config) and
    its features (from the tower's output)."""

    prefixes: tuple[str, ...]
    config: Callable[[Any], Any]
    dim: Callable[[Any], int]
    features: Callable[[Any], torch.Tensor]


#: Text towers by class name. CLIPTextModelWithProjection's `text_embeds` is exactly what
#: CLIPModel.get_text_features gives (the projected pooled output at the end-of-text token).
TEXT_TOWERS: dict[str, TextTower] = {
    "CLIPTextModelWithProjection": TextTower(
        prefixes=("text_model.", "text_projection."),
        config=_clip_text_config,
        dim=lambda c: int(c.projection_dim),
        features=lambda out: out.text_embeds,
    ),
}


class TransformersTextEncoder(TextEncoder):
    """The text tower of a transformers model and its tokenizer, from the model's checkpoint:
    only the tower's tensors are read (for CLIP, no vision tensor is loaded)."""

    model: torch.nn.Module
    tokenizer: Any
    max_length: int  # tokens, the special ones included (longer texts are truncated)
    features: Callable[[Any], torch.Tensor]

    def _load(self, source: Source | None, resolved: Resolved) -> None:
        import transformers

        assert isinstance(resolved, HFCheckpoint) and source is not None
        name, cls_name = self.spec.name, self.spec.text_tower or ""
        if cls_name not in TEXT_TOWERS:
            raise ValueError(f"{name}: unknown text tower {cls_name!r} (known: {', '.join(TEXT_TOWERS)})")
        tower = TEXT_TOWERS[cls_name]
        self.revision = resolved.revision
        tokenizer_dir = resolve_tokenizer(self.spec, source, resolved, download=True)  # first: cheap
        log.info("%s: loading %s from %s", name, cls_name, resolved.directory)
        config = tower.config(
            transformers.AutoConfig.from_pretrained(str(resolved.directory), local_files_only=True)
        )
        cls = getattr(transformers, cls_name)
        with torch.device("meta"):
            expected = set(cls(config).state_dict())
        tensors = read_tensors(resolved.weight_files, tower.prefixes)
        missing = sorted(expected - set(tensors))
        if missing:
            raise WeightsUnavailableError(
                f"{name}: checkpoint {resolved.directory} lacks {len(missing)} text tower "
                f"tensor(s) such as {missing[0]}; is it a {self.spec.architecture} checkpoint?"
            )
        self.model = cls.from_pretrained(
            None, config=config, state_dict={k: tensors[k] for k in expected}, dtype=self.dtype
        ).to(self.device).eval()
        self.features = tower.features
        self.dim = tower.dim(config)
        self.max_length = int(config.max_position_embeddings)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir),
                                                                   local_files_only=True)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"{self.spec.name}: text {i} must be a string, got {type(t).__name__}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        enc = self.tokenizer(texts, padding=len(texts) > 1, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(input_ids=enc["input_ids"].to(self.device),
                             attention_mask=enc["attention_mask"].to(self.device))
        return self.features(out).float().cpu().numpy().reshape(len(texts), self.dim)
