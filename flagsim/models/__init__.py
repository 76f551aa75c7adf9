"""Model registry and embedders: `get_spec`, `check_weights`, `create_embedder` and friends.

Importing this package does not import torch; the embedder families load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flagsim.models import builtin as _builtin  # noqa: F401  (registers the built-in models)
from flagsim.models.options import EmbedOptions
from flagsim.models.registry import (
    FAMILIES,
    check_model_names,
    check_weights,
    create_embedder,
    create_text_encoder,
    get_spec,
    has_text_tower,
    list_models,
    no_text_tower,
    register_model,
    text_models,
    unregister_model,
)
from flagsim.models.spec import ModelSpec

if TYPE_CHECKING:
    from flagsim.models.base import Embedder, TextEncoder

__all__ = [
    "FAMILIES",
    "EmbedOptions",
    "Embedder",
    "ModelSpec",
    "TextEncoder",
    "check_model_names",
    "check_weights",
    "create_embedder",
    "create_text_encoder",
    "get_spec",
    "has_text_tower",
    "list_models",
    "no_text_tower",
    "register_model",
    "text_models",
    "unregister_model",
]


def __getattr__(name: str) -> Any:
    if name in ("Embedder", "TextEncoder"):  # imports torch, so only on demand
        from flagsim.models import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
