"""Real-size random-weight vision models (the six original architectures) and tensor preprocessing.

Every architecture is built from its transformers config class (or torchvision's vgg16) with the
published checkpoint's hyperparameters written out here, so no weights are ever downloaded. The
embedding is taken the way the original experiment took it. `tiny=True` shrinks depth and width
for CPU smoke runs. Preprocessing is plain torch on tensors, so it runs on the CPU or the GPU
unchanged. Only torch and transformers are needed (torchvision is optional), so that
scripts/gpu_check.py can use this module on a bare GPU machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


# --- configs (real hyperparameters of each checkpoint; tiny variants for smoke runs) -------------

def vit_l16_config(tiny: bool = False) -> Any:
    """google/vit-large-patch16-224-in21k."""
    from transformers import ViTConfig

    if tiny:
        return ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, image_size=224, patch_size=16)
    return ViTConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, qkv_bias=True,
    )


def clip_b32_vision_config(tiny: bool = False) -> Any:
    """openai/clip-vit-base-patch32, vision tower + visual projection."""
    from transformers import CLIPVisionConfig

    if tiny:
        return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, image_size=224, patch_size=32,
                                projection_dim=512, hidden_act="quick_gelu")
    return CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def clip_b32_config(tiny: bool = False) -> Any:
    """The whole openai/clip-vit-base-patch32 (text tower too), as flagsim's `clip` loads it."""
    from transformers import CLIPConfig

    v = clip_b32_vision_config(tiny).to_dict()
    if tiny:
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16,
                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    else:
        text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 8, "vocab_size": 49408, "max_position_embeddings": 77,
                "hidden_act": "quick_gelu"}
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps")
    return CLIPConfig(text_config=text, vision_config={k: v[k] for k in keep},
                      projection_dim=512)


def blip2_configs(tiny: bool = False) -> tuple[Any, Any, int]:
    """Salesforce/blip2-opt-2.7b: EVA ViT-g/14 vision tower and Q-Former (32 queries); no OPT.

    initializer_range is raised from the checkpoint's 1e-10 so that random weights give
    non-degenerate activations; it does not change the architecture or its cost.
    """
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    if tiny:
        v = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, image_size=224, patch_size=14,
                              initializer_range=0.02)
        q = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, encoder_hidden_size=64)
        return v, q, 4
    v = Blip2VisionConfig(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        initializer_range=0.02,
    )
    q = Blip2QFormerConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        cross_attention_frequency=2, encoder_hidden_size=1408, layer_norm_eps=1e-12,
    )
    return v, q, 32


def blip2_config(tiny: bool = False) -> Any:
    """A Blip2Config around blip2_configs (with a 1-layer OPT that flagsim never builds)."""
    from transformers import Blip2Config

    v, q, n = blip2_configs(tiny)
    text = {"model_type": "opt", "hidden_size": 16, "num_hidden_layers": 1, "ffn_dim": 32,
            "num_attention_heads": 2, "vocab_size": 64, "word_embed_proj_dim": 16,
            "max_position_embeddings": 64}
    return Blip2Config(vision_config=v.to_dict(), qformer_config=q.to_dict(), text_config=text,
                       num_query_tokens=n)


def efficientnet_b7_config(tiny: bool = False) -> Any:
    """google/efficientnet-b7 at its native 600 px."""
    from transformers import EfficientNetConfig

    if tiny:
        return EfficientNetConfig(image_size=600, width_coefficient=0.25, depth_coefficient=0.3,
                                  hidden_dim=320, dropout_rate=0.0)
    return EfficientNetConfig(
        image_size=600, width_coefficient=2.0, depth_coefficient=3.1, dropout_rate=0.5,
        hidden_dim=2560, depth_divisor=8, batch_norm_eps=1e-3,
    )


def dinov2_base_config(tiny: bool = False) -> Any:
    """facebook/dinov2-base (position embeddings for 518 px, interpolated to 224 px inputs)."""
    from transformers import Dinov2Config

    if tiny:
        return Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=518, patch_size=14)
    return Dinov2Config(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
        image_size=518, patch_size=14, layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True,
    )


# --- modules -------------------------------------------------------------------------------------

def _vgg16_module(tiny: bool):
    """torchvision's vgg16(weights=None); the same layer list by hand if torchvision is missing."""
    import torch
    from torch import nn

    if tiny:  # a cheap stand-in with the same input/output shapes for smoke runs
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(8 * 49, 1000),
        )
    try:
        from torchvision.models import vgg16

        return vgg16(weights=None)
    except ImportError:
        layers: list[nn.Module] = []
        c = 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                  512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
                c = int(v)
        return nn.Sequential(
            nn.Sequential(*layers), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
            nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096),
            nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000), torch.nn.Identity(),
        )


def _kaiming_convs(model) -> None:
    """Variance-preserving init for EfficientNet (kaiming fan-in convs, unit BN, residual
    branches scaled by 0.2).

    The transformers default (normal, std 0.02) shrinks random activations to ~1e-14 over 55
    blocks, and plain fan-in init grows them past fp16's range through the residual sums; either
    would make the fp16 parity check meaningless. Trained weights sit in between.
    """
    import torch

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, mode="fan_in")
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    for mod in model.modules():
        if getattr(mod, "apply_dropout", False) and hasattr(mod, "project_bn"):  # residual blocks
            torch.nn.init.constant_(mod.project_bn.weight, 0.2)


def _build_vit(tiny: bool):
    from transformers import ViTModel

    return ViTModel(vit_l16_config(tiny), add_pooling_layer=True), (
        lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]
    )


def _build_clip(tiny: bool):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(clip_b32_vision_config(tiny)), (
        lambda m, x: m(pixel_values=x).image_embeds
    )


def _build_blip2(tiny: bool):
    import torch
    from transformers import Blip2QFormerModel, Blip2VisionModel

    vcfg, qcfg, n_query = blip2_configs(tiny)

    class Blip2Features(torch.nn.Module):
        """Vision tower -> Q-Former with learned queries; the first query token is the vector.

        Like flagsim's BLIP-2 embedder (and Blip2Model's _keep_in_fp32_modules), the Q-Former
        and query tokens stay float32 when the vision tower runs in float16.
        """

        def __init__(self) -> None:
            super().__init__()
            self.vision_model = Blip2VisionModel(vcfg)
            self.qformer = Blip2QFormerModel(qcfg)
            self.query_tokens = torch.nn.Parameter(torch.randn(1, n_query, qcfg.hidden_size) * 0.02)

        def keep_fp32(self) -> None:
            self.qformer.float()
            self.query_tokens.data = self.query_tokens.data.float()

        def forward(self, pixel_values):
            image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
            image_embeds = image_embeds.to(self.query_tokens.dtype)
            mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            q = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
            out = self.qformer(query_embeds=q, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=mask)
            return out.last_hidden_state[:, 0]

    return Blip2Features(), (lambda m, x: m(x))


def _build_efficientnet(tiny: bool):
    from transformers import EfficientNetModel

    model = EfficientNetModel(efficientnet_b7_config(tiny))
    _kaiming_convs(model)

    def embed(m, x):
        # = mean over H, W of hidden_states[-1] (the last block, 640 channels), without
        # keeping every hidden state or computing the unused top conv
        h = m.embeddings(x)
        for block in m.encoder.blocks:
            h = block(h)
        return h.mean(dim=(2, 3))

    return model, embed


def _build_dinov2(tiny: bool):
    from transformers import Dinov2Model

    return Dinov2Model(dinov2_base_config(tiny)), (
        lambda m, x: m(pixel_values=x).last_hidden_state[:, 0]
    )


def _build_vgg16(tiny: bool):
    return _vgg16_module(tiny), (lambda m, x: m(x))  # the 1000 logits, as the original


@dataclass(frozen=True)
class Arch:
    """One architecture: checkpoint name, embedding dim, preprocessing, builder, flagsim name."""

    name: str
    checkpoint: str  # the pretrained checkpoint whose hyperparameters are used
    dim: int
    prep: Prep
    build: Callable[[bool], tuple[Any, Callable]]  # tiny -> (module, embed(module, x) -> [N, dim])
    flagsim_model: str  # the flagsim registry entry of the same architecture
    flagsim_config: Callable[[bool], Any] | None  # the config/module flagsim's family builds from
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256)
    smoke_prep: Prep | None = None  # smaller inputs for tiny=True (fully convolutional models)
    channels_last: bool = False  # NHWC model + input, as flagsim's registry entry runs it

    def prep_for(self, tiny: bool) -> Prep:
        return self.smoke_prep if tiny and self.smoke_prep else self.prep


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("clip-b32", "openai/clip-vit-base-patch32", 512,
             Prep(224, 224, True, "bicubic", CLIP_MEAN, CLIP_STD), _build_clip,
             "clip", clip_b32_config, (64, 128, 256, 512, 1024)),
        Arch("vit-l16", "google/vit-large-patch16-224-in21k", 1024,
             Prep(224, None, False, "bilinear", HALF, HALF), _build_vit,
             "vit", vit_l16_config, (32, 64, 128, 256)),
        Arch("dinov2-base", "facebook/dinov2-base", 768,
             Prep(256, 224, True, "bicubic", IMAGENET_MEAN, IMAGENET_STD), _build_dinov2,
             "dinov2", dinov2_base_config, (64, 128, 256, 512)),
        Arch("vgg16", "torchvision vgg16 (IMAGENET1K_V1 shapes)", 1000,
             Prep(256, 224, True, "bilinear", IMAGENET_MEAN, IMAGENET_STD), _build_vgg16,
             "vgg16", _vgg16_module, (32, 64, 128, 256), channels_last=True),
        Arch("efficientnet-b7", "google/efficientnet-b7", 640,
             Prep(600, None, False, "bilinear", IMAGENET_MEAN, IMAGENET_STD), _build_efficientnet,
             "efficientnet", efficientnet_b7_config, (16, 32, 64, 128),
             smoke_prep=Prep(64, None, False, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
             channels_last=True),
        Arch("blip2", "Salesforce/blip2-opt-2.7b (vision tower + Q-Former)", 768,
             Prep(224, None, False, "bicubic", CLIP_MEAN, CLIP_STD), _build_blip2,
             "blip2", blip2_config, (32, 64, 128, 256)),
    )
}


def flagsim_spec(arch: str | Arch, tiny: bool = False):
    """flagsim's registry spec of the same architecture, renamed `bench-<arch>`; load it with
    `weights=flagsim_weights(arch, tiny)` (flagsim's own embedder code)."""
    from flagsim.models import get_spec

    a = ARCHS[arch] if isinstance(arch, str) else arch
    return dataclasses.replace(get_spec(a.flagsim_model), name=f"bench-{a.name}")


def flagsim_weights(arch: str | Arch, tiny: bool = False) -> str:
    """A random-weight checkpoint of the architecture at real size (or its smoke size), written
    once per process by flagsim.models.testing and read by flagsim's real local-directory
    loader."""
    from flagsim.models import get_spec
    from flagsim.models.testing import TINY, random_checkpoint, tiny_checkpoint

    a = ARCHS[arch] if isinstance(arch, str) else arch
    if tiny and a.name == "vgg16":  # flagsim's own tiny VGG (its embedder needs .classifier)
        return str(tiny_checkpoint(a.flagsim_model))
    base = get_spec(a.flagsim_model)
    processor = TINY[base.architecture].processor if tiny and a.smoke_prep else base.processor
    return str(random_checkpoint(a.flagsim_model, f"bench-{'smoke' if tiny else 'real'}",
                                 config=a.flagsim_config(tiny), processor=processor))


class RandomEmbedder:
    """A built architecture on a device/dtype: `preprocess` (tensor ops) + `forward` -> np [N, dim]."""

    def __init__(self, arch: str | Arch, device: str = "cpu", dtype: str = "float32",
                 tiny: bool = False, seed: int = 0) -> None:
        import torch

        self.arch = ARCHS[arch] if isinstance(arch, str) else arch
        self.device = torch.device(device)
        self.tiny = tiny
        self.prep = self.arch.prep_for(tiny)
        torch.manual_seed(seed)
        ctx = torch.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:  # initialise straight on the GPU: much faster for 1B parameters
            module, self._embed = self.arch.build(tiny)
        self.module = module.eval().to(self.device)
        self.memory_format = torch.channels_last if self.arch.channels_last else None
        if self.memory_format is not None:
            self.module = self.module.to(memory_format=self.memory_format)
        self.dtype = torch.float32
        self.to_dtype(dtype)
        self.dim = self.arch.dim if not tiny else self._probe_dim()

    def to_dtype(self, dtype: str) -> None:
        """Cast in place (fp16/bf16), keeping the modules flagsim keeps in float32."""
        import torch

        self.dtype = getattr(torch, dtype)
        self.module.to(self.dtype)
        if self.dtype != torch.float32 and hasattr(self.module, "keep_fp32"):
            self.module.keep_fp32()

    def _probe_dim(self) -> int:
        import torch

        s = self.prep.out_size
        x = torch.zeros(1, 3, s, s, device=self.device, dtype=self.dtype)
        return int(self.forward_tensor(x).shape[-1])

    def preprocess(self, images: Sequence[np.ndarray]):
        return preprocess_tensors(images, self.prep, self.device, self.dtype)

    def forward_tensor(self, x):
        import torch

        if self.memory_format is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            return self._embed(self.module, x)

    def forward(self, x) -> np.ndarray:
        return self.forward_tensor(x).float().cpu().numpy()

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.forward(self.preprocess(images))


def _target_size(h: int, w: int, prep: Prep) -> tuple[int, int]:
    if not prep.keep_aspect:
        return prep.resize, prep.resize
    if h <= w:
        return prep.resize, max(1, int(prep.resize * w / h))
    return max(1, int(prep.resize * h / w)), prep.resize


def preprocess_tensors(images: Sequence[np.ndarray], prep: Prep, device, dtype):
    """HxWx3 uint8 arrays -> normalised [N, 3, S, S] tensor on `device`, resizing there.

    All images travel to the device in one uint8 copy (4x less traffic than float32); images of
    the same shape are resized together with antialiasing (torch.nn.functional.interpolate, so
    the same code runs on a CPU or a GPU), then centre-cropped and normalised.
    """
    import torch
    import torch.nn.functional as F

    device = torch.device(device)
    arrays = [np.asarray(im) for im in images]
    offsets = np.cumsum([0] + [a.size for a in arrays])
    flat = np.empty(int(offsets[-1]), np.uint8)
    for a, o in zip(arrays, offsets[:-1], strict=False):
        flat[o : o + a.size] = a.ravel()
    buf = torch.from_numpy(flat)
    if device.type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.shape, []).append(i)
    s = prep.out_size
    out = torch.empty(len(arrays), 3, s, s, device=device, dtype=torch.float32)
    for shape, idx in groups.items():
        h0, w0, _ = shape
        t = torch.stack([buf[offsets[i] : offsets[i + 1]].view(h0, w0, 3) for i in idx])
        t = t.permute(0, 3, 1, 2).float()
        h, w = _target_size(h0, w0, prep)
        t = F.interpolate(t, size=(h, w), mode=prep.interpolation, antialias=True,
                          align_corners=False)
        if prep.crop:
            top, left = (h - prep.crop) // 2, (w - prep.crop) // 2
            t = t[:, :, top : top + prep.crop, left : left + prep.crop]
        out[torch.tensor(idx, device=device)] = t
    out.clamp_(0, 255).div_(255.0)
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
    return out.sub_(mean).div_(std).to(dtype)
