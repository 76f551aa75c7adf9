"""Real-size random-weight vision models (the six original architectures) and tensor preprocessing.

Every architecture is built from its transformers config class (or torchvision) with the published
checkpoint's hyperparameters written out here, so no weights are ever downloaded. The embedding is
taken the way the original experiment took it. `tiny=True` shrinks depth/width for CPU smoke runs.
Preprocessing is plain torch/torchvision on tensors, so it runs on the CPU or the GPU unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Prep:
    """How a checkpoint's image processor prepares pixels (resize, crop, normalise)."""

    resize: int  # target size: the short side (keep_aspect) or both sides (square)
    crop: int | None  # centre crop after resizing; None = no crop
    keep_aspect: bool  # True: short side -> resize; False: resize to resize x resize
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def out_size(self) -> int:
        return self.crop or self.resize


@dataclass(frozen=True)
class Arch:
    """One architecture: its checkpoint name, embedding dim, preprocessing and model builder."""

    name: str
    checkpoint: str  # the pretrained checkpoint whose hyperparameters are used
    dim: int
    prep: Prep
    build: Callable[[bool], tuple[object, Callable]]  # tiny -> (module, embed(module, x) -> [N, dim])
    default_batch: int = 32


# --- builders ----------------------------------------------------------------------------------

def _vit_l16(tiny: bool):
    from transformers import ViTConfig, ViTModel

    # google/vit-large-patch16-224-in21k
    cfg = ViTConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, qkv_bias=True,
    )
    if tiny:
        cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, image_size=224, patch_size=16)
    model = ViTModel(cfg, add_pooling_layer=True)

    def embed(m, x):
        return m(pixel_values=x).last_hidden_state[:, 0]

    return model, embed


def _clip_b32(tiny: bool):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # openai/clip-vit-base-patch32 (vision tower + visual projection)
    cfg = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    if tiny:
        cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, image_size=224, patch_size=32,
                               projection_dim=512, hidden_act="quick_gelu")
    model = CLIPVisionModelWithProjection(cfg)

    def embed(m, x):
        return m(pixel_values=x).image_embeds

    return model, embed


def _blip2(tiny: bool):
    import torch
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

    # Salesforce/blip2-opt-2.7b: EVA ViT-g/14 vision tower + Q-Former with 32 queries (no OPT).
    # initializer_range is raised from the checkpoint's 1e-10 so that random weights give
    # non-degenerate activations; it does not change the architecture or its cost.
    vcfg = Blip2VisionConfig(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        initializer_range=0.02,
    )
    qcfg = Blip2QFormerConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        cross_attention_frequency=2, encoder_hidden_size=1408, layer_norm_eps=1e-12,
    )
    n_query = 32
    if tiny:
        vcfg = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=224, patch_size=14,
                                 initializer_range=0.02)
        qcfg = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, encoder_hidden_size=64)
        n_query = 4

    class Blip2Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision_model = Blip2VisionModel(vcfg)
            self.qformer = Blip2QFormerModel(qcfg)
            self.query_tokens = torch.nn.Parameter(torch.randn(1, n_query, qcfg.hidden_size) * 0.02)

        def forward(self, pixel_values):
            image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
            mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            q = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            out = self.qformer(query_embeds=q, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=mask)
            return out.last_hidden_state[:, 0]  # the first query token, as in the original

    def embed(m, x):
        return m(x)

    return Blip2Features(), embed


def _efficientnet_b7(tiny: bool):
    from transformers import EfficientNetConfig, EfficientNetModel

    # google/efficientnet-b7 at its native 600 px; embedding = mean of the last block's output
    # (640 channels), i.e. hidden_states[-1] of the original, without computing the top conv.
    cfg = EfficientNetConfig(
        image_size=600, width_coefficient=2.0, depth_coefficient=3.1, dropout_rate=0.5,
        hidden_dim=2560, depth_divisor=8, batch_norm_eps=1e-3,
    )
    if tiny:
        cfg = EfficientNetConfig(image_size=600, width_coefficient=0.25, depth_coefficient=0.3,
                                 hidden_dim=64)
    model = EfficientNetModel(cfg)

    def embed(m, x):
        h = m.embeddings(x)
        for block in m.encoder.blocks:
            h = block(h)
        return h.mean(dim=(2, 3))

    return model, embed


def _dinov2_base(tiny: bool):
    from transformers import Dinov2Config, Dinov2Model

    # facebook/dinov2-base (position embeddings for 518 px, interpolated to the 224 px input)
    cfg = Dinov2Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
        image_size=518, patch_size=14, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True,
    )
    if tiny:
        cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=518, patch_size=14)
    model = Dinov2Model(cfg)

    def embed(m, x):
        return m(pixel_values=x).last_hidden_state[:, 0]

    return model, embed


def _vgg16(tiny: bool):
    import torch
    from torchvision.models import vgg11, vgg16

    model = vgg11(weights=None, num_classes=1000) if tiny else vgg16(weights=None)
    if tiny:  # a cheap stand-in with the same input/output shapes for smoke runs
        model.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1),
                                             torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d((7, 7)))
        model.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 49, 1000))
        model.avgpool = torch.nn.Identity()

    def embed(m, x):
        return m(x)  # the original used the 1000 logits

    return model, embed


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("vit-l16", "google/vit-large-patch16-224-in21k", 1024,
             Prep(224, None, False, "bilinear", HALF, HALF), _vit_l16, 16),
        Arch("clip-b32", "openai/clip-vit-base-patch32", 512,
             Prep(224, 224, True, "bicubic", CLIP_MEAN, CLIP_STD), _clip_b32, 64),
        Arch("blip2", "Salesforce/blip2-opt-2.7b (vision + Q-Former)", 768,
             Prep(224, None, False, "bicubic", CLIP_MEAN, CLIP_STD), _blip2, 8),
        Arch("efficientnet-b7", "google/efficientnet-b7", 640,
             Prep(600, None, False, "bilinear", IMAGENET_MEAN, IMAGENET_STD), _efficientnet_b7, 8),
        Arch("dinov2-base", "facebook/dinov2-base", 768,
             Prep(256, 224, True, "bicubic", IMAGENET_MEAN, IMAGENET_STD), _dinov2_base, 32),
        Arch("vgg16", "torchvision vgg16", 1000,
             Prep(256, 224, True, "bilinear", IMAGENET_MEAN, IMAGENET_STD), _vgg16, 32),
    )
}


class RandomEmbedder:
    """A built architecture on a device/dtype: `preprocess` (tensor ops) + `forward` -> np [N, dim]."""

    def __init__(self, arch: str | Arch, device: str = "cpu", dtype: str = "float32",
                 tiny: bool = False, seed: int = 0) -> None:
        import torch

        self.arch = ARCHS[arch] if isinstance(arch, str) else arch
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        torch.manual_seed(seed)
        module, self._embed = self.arch.build(tiny)
        self.module = module.eval().to(self.device, self.dtype)
        self.dim = self.arch.dim

    def preprocess(self, images: Sequence[np.ndarray]):
        return preprocess_tensors(images, self.arch.prep, self.device, self.dtype)

    def forward_tensor(self, x):
        import torch

        with torch.inference_mode():
            return self._embed(self.module, x)

    def forward(self, x) -> np.ndarray:
        return self.forward_tensor(x).float().cpu().numpy()

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.forward(self.preprocess(images))


def preprocess_tensors(images: Sequence[np.ndarray], prep: Prep, device, dtype):
    """HxWx3 uint8 arrays -> normalised [N, 3, S, S] tensor on `device`, resizing there.

    Images are uploaded as uint8 (4x less traffic than float) and resized with antialiasing
    on the target device, the way torchvision-backed ("fast") image processors do it.
    """
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode.BICUBIC if prep.interpolation == "bicubic" else InterpolationMode.BILINEAR
    out = []
    for im in images:
        t = torch.from_numpy(np.ascontiguousarray(im)).to(device, non_blocking=True).permute(2, 0, 1)
        if prep.keep_aspect:
            t = F.resize(t, [prep.resize], interpolation=mode, antialias=True)
        else:
            t = F.resize(t, [prep.resize, prep.resize], interpolation=mode, antialias=True)
        if prep.crop:
            t = F.center_crop(t, [prep.crop, prep.crop])
        out.append(t)
    batch = torch.stack(out).to(dtype=torch.float32).div_(255.0)
    mean = torch.tensor(prep.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std).to(dtype)
