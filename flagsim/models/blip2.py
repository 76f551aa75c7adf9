"""BLIP-2 image features from the vision tower and Q-Former only (the language model is never loaded)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from flagsim.errors import WeightsUnavailableError
from flagsim.models.base import Pooling, read_tensors
from flagsim.models.hf import TransformersEmbedder, make_processor
from flagsim.models.sources import HFCheckpoint, Resolved

log = logging.getLogger(__name__)

#: The checkpoint tensors this embedder reads (everything else, e.g. language_model.*, is skipped).
PREFIXES = ("vision_model.", "qformer.", "query_tokens")


class Blip2QFormerFeatures(nn.Module):
    """The image half of Blip2Model: vision tower, query tokens and Q-Former.

    `forward` returns what `Blip2Model.get_qformer_features` returns (the Q-Former's last hidden
    states, [N, num_query_tokens, hidden]); the Q-Former and query tokens stay in float32 as
    Blip2Model's `_keep_in_fp32_modules` keeps them.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import Blip2QFormerModel, Blip2VisionModel

        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
        )
        self.qformer = Blip2QFormerModel(config.qformer_config)

    def to_dtype(self, dtype: torch.dtype) -> Blip2QFormerFeatures:
        self.vision_model.to(dtype)
        self.qformer.float()
        self.query_tokens.data = self.query_tokens.data.float()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=mask,
            return_dict=True,
        )
        return out.last_hidden_state


def load_qformer_features(ckpt: HFCheckpoint, name: str) -> Blip2QFormerFeatures:
    """Build Blip2QFormerFeatures on the meta device and fill it from the checkpoint's tensors."""
    from transformers import Blip2Config

    config = Blip2Config.from_pretrained(str(ckpt.directory), local_files_only=True)
    tensors = read_tensors(ckpt.weight_files, PREFIXES)
    with torch.device("meta"):
        module = Blip2QFormerFeatures(config)
    expected = set(module.state_dict())
    missing = sorted(expected - set(tensors))
    if missing:
        raise WeightsUnavailableError(
            f"{name}: checkpoint {ckpt.directory} lacks {len(missing)} vision/Q-Former tensor(s) "
            f"such as {missing[0]}; is it a BLIP-2 checkpoint?"
        )
    extra = sorted(set(tensors) - expected)
    if extra:
        log.warning("%s: ignoring %d unexpected tensor(s) such as %s", name, len(extra), extra[0])
    module.load_state_dict({k: tensors[k] for k in expected}, strict=True, assign=True)
    module.loaded_keys = sorted(tensors)  # type: ignore[attr-defined]
    return module


class Blip2QFormerEmbedder(TransformersEmbedder):
    """BLIP-2 Q-Former features: get_qformer_features(pixels)[:, 0] (first query token)."""

    POOLINGS = {
        "qformer_first_query": Pooling(
            run=lambda e, px: e.model(px)[:, 0],
            dim=lambda e: e.model.config.qformer_config.hidden_size,
        ),
    }

    def _load(self, resolved: Resolved) -> None:
        assert isinstance(resolved, HFCheckpoint)
        self.revision = resolved.revision
        log.info("%s: loading vision tower + Q-Former from %s", self.spec.name, resolved.directory)
        self.model = load_qformer_features(resolved, self.spec.name)
        self.processor = make_processor(self.spec.processor_class, dict(self.spec.processor),
                                        resolved, self.spec.name)
        self._finish()

    def _finish(self) -> None:
        self.model = self.model.to(self.device).to_dtype(self.dtype).eval()
