"""Model registry and embedders (TEMPORARY minimal version: being replaced by the registry work)."""

from __future__ import annotations

from flagsim.errors import UnknownModelError

MODEL_NAMES = ("vit", "clip", "blip2", "efficientnet", "dinov2", "vgg16", "vgg16-fc7",
               "efficientnet-lite0", "pixels")


def list_models() -> list[str]:
    return list(MODEL_NAMES)


def check_model_names(names) -> None:
    for n in names:
        if n not in MODEL_NAMES:
            raise UnknownModelError(f"unknown model {n!r}; valid models: {', '.join(MODEL_NAMES)}")
