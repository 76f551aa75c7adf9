"""Real-size transformers configs of the original experiment's checkpoints (no weights needed).

Each config writes out the published checkpoint's hyperparameters, so that bench/checkpoints.py
can save a random-weight model of the real size for flagsim to load; `tiny=True` shrinks depth
and width for CPU smoke runs. flagsim's registry holds the models themselves (preprocessing,
pooling, loading): nothing here runs a model.
"""

from __future__ import annotations

from typing import Any

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


# --- initialisation ------------------------------------------------------------------------------

def kaiming_convs(model) -> None:
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
